//! `sluice.complete_many`: ends attempts as succeeded, in Rust.
//!
//! Every task of a drain ends here, in batches. Most attempts are claimed in memory
//! (`crate::claims`): their rows still say queued at the attempt before, and one update writes
//! the claim and the ending together. As plpgsql, finding them took a set-returning call that
//! listed the claims, a join with the arrays and four aggregates before the update, about a
//! fifth of the completion's time. Here the claims are looked up in shared memory directly and
//! each of the two updates is one plan kept for the session.
//!
//! Fencing: an attempt is completed only if it is current and this worker's. In memory, that
//! is a claim of exactly (task, attempt, worker) and a row still queued at the attempt before
//! (a claim settled into its row meanwhile fails this and is ended by the second update); in
//! the row, it is `running` at that attempt under that worker. Anything else is a late or
//! duplicate completion and changes nothing.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;

use crate::claims;
use crate::spi_plans;
use crate::wake;

/// Attempts claimed in memory. $1 worker, $2 all ids, $3 their attempts, $4 their outputs,
/// $5 the claims' pick times (by position in $2), $6 the ids held in memory.
const HELD_SQL: &CStr = c"UPDATE sluice.task_run t
   SET status = 'succeeded', output = $4[sluice._array_position($2, t.id)],
       finished_at = now(), timeout_at = NULL, attempt = t.attempt + 1, worker_id = $1,
       assigned_at = $5[sluice._array_position($2, t.id)],
       picked_at = $5[sluice._array_position($2, t.id)]
 WHERE t.id = ANY($6) AND t.status::text = 'queued'
   AND t.attempt = $3[sluice._array_position($2, t.id)] - 1
RETURNING t.id, t.attempt";

/// Attempts running in their rows. $1 worker, $2 all ids, $3 their attempts, $4 their outputs,
/// $5 the ids not ended by the first update.
const RUNNING_SQL: &CStr = c"UPDATE sluice.task_run t
   SET status = 'succeeded', output = $4[sluice._array_position($2, t.id)],
       finished_at = now(), timeout_at = NULL
 WHERE t.id = ANY($5) AND t.attempt = $3[sluice._array_position($2, t.id)]
   AND t.worker_id = $1 AND t.status::text = 'running'
RETURNING t.id, t.attempt";

thread_local! {
    static HELD_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static RUNNING_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_complete_many() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `sluice.complete_many(worker_id bigint, task_ids bigint[], attempts int[], outputs jsonb[])
/// RETURNS SETOF bigint`, strict, returning a materialized set: the ids of the attempts it
/// ended.
///
/// # Safety
/// Called by Postgres through the version-1 convention with the four arguments above, none
/// NULL, in a context that accepts a materialized set.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_complete_many(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = (*fcinfo).args.as_slice(4);
        let worker_id = args[0].value.value() as i64;
        let ids_datum = args[1].value;
        let attempts_datum = args[2].value;
        let outputs_datum = args[3].value;
        // A NULL element becomes 0, which no task id or attempt equals (ids start at 1,
        // attempts fetched at 1), so it ends nothing.
        let ids: Vec<i64> = Array::<i64>::from_datum(ids_datum, false)
            .map(|a| a.iter().map(|e| e.unwrap_or(0)).collect())
            .unwrap_or_default();
        let attempts: Vec<i32> = Array::<i32>::from_datum(attempts_datum, false)
            .map(|a| a.iter().map(|e| e.unwrap_or(0)).collect())
            .unwrap_or_default();
        let outputs = Array::<pgrx::JsonB>::from_datum(outputs_datum, false).map_or(0, |a| a.len());
        if ids.len() != attempts.len() || ids.len() != outputs {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "task_ids, attempts and outputs must have the same length ({}, {}, {})",
                    ids.len(),
                    attempts.len(),
                    outputs
                )
            );
        }
        // SETOF bigint: the expected descriptor is the one column (a row type is not needed).
        pg_sys::InitMaterializedSRF(fcinfo, pg_sys::MAT_SRF_USE_EXPECTED_DESC as pg_sys::bits32);
        let result = (*(*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>()).setResult;
        let desc = (*(*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>()).setDesc;
        if ids.is_empty() {
            return pg_sys::Datum::from(0);
        }

        // The claims this worker holds for exactly these attempts, with their pick times by
        // position (NULL where none).
        let mut held_ids = Vec::new();
        let mut picked: Vec<Option<TimestampWithTimeZone>> = vec![None; ids.len()];
        for (i, claim) in claims::held_of(&ids, &attempts, worker_id) {
            held_ids.push(claim.task_id);
            picked[i] = Some(crate::timestamptz(claim.picked_at));
        }

        let nest_level = spi_plans::connect("sluice.complete_many");

        let mut ended_ids: Vec<i64> = Vec::with_capacity(ids.len());
        let mut ended_attempts: Vec<i32> = Vec::with_capacity(ids.len());
        let worker = pg_sys::Datum::from(worker_id);
        if !held_ids.is_empty() {
            let mut values = [
                worker,
                ids_datum,
                attempts_datum,
                outputs_datum,
                picked.into_datum().expect("an array is never NULL"),
                held_ids.into_datum().expect("an array is never NULL"),
            ];
            let types = [
                pg_sys::INT8OID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::JSONBARRAYOID,
                pg_sys::TIMESTAMPTZARRAYOID,
                pg_sys::INT8ARRAYOID,
            ];
            let table = spi_plans::execute(
                &HELD_PLAN,
                HELD_SQL,
                &types,
                &mut values,
                false,
                pg_sys::SPI_OK_UPDATE_RETURNING,
            );
            collect_ended(table, &mut ended_ids, &mut ended_attempts);
        }
        if ended_ids.len() < ids.len() {
            let ended: rustc_hash::FxHashSet<i64> = ended_ids.iter().copied().collect();
            let remaining: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !ended.contains(id))
                .collect();
            let mut values = [
                worker,
                ids_datum,
                attempts_datum,
                outputs_datum,
                remaining.into_datum().expect("an array is never NULL"),
            ];
            let types = [
                pg_sys::INT8OID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::JSONBARRAYOID,
                pg_sys::INT8ARRAYOID,
            ];
            let table = spi_plans::execute(
                &RUNNING_PLAN,
                RUNNING_SQL,
                &types,
                &mut values,
                false,
                pg_sys::SPI_OK_UPDATE_RETURNING,
            );
            collect_ended(table, &mut ended_ids, &mut ended_attempts);
        }
        spi_plans::finish(nest_level);

        if !ended_ids.is_empty() {
            wake::attempts_ended(&ended_ids, &ended_attempts);
            wake::require_scheduler();
            wake::wake_at_commit(None);
        }
        for id in ended_ids {
            let mut values = [pg_sys::Datum::from(id)];
            let mut nulls = [false];
            pg_sys::tuplestore_putvalues(result, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        }
        pg_sys::Datum::from(0)
    }
}

/// Collects the (id, attempt) an update returned. Inside SPI.
unsafe fn collect_ended(
    table: *mut pg_sys::SPITupleTable,
    ended_ids: &mut Vec<i64>,
    ended_attempts: &mut Vec<i32>,
) {
    unsafe {
        let desc = (*table).tupdesc;
        for i in 0..pg_sys::SPI_processed as usize {
            let tuple = *(*table).vals.add(i);
            let mut id_null = false;
            let mut attempt_null = false;
            let id = pg_sys::SPI_getbinval(tuple, desc, 1, &mut id_null);
            let attempt = pg_sys::SPI_getbinval(tuple, desc, 2, &mut attempt_null);
            if !id_null && !attempt_null {
                ended_ids.push(id.value() as i64);
                ended_attempts.push(attempt.value() as i32);
            }
        }
    }
}
