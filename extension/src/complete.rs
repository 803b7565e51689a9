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

/// Attempts claimed in memory. $1 worker, then one row per attempt: $2 ids, $3 attempts, $4
/// outputs, $5 the claims' pick times. `status::text`: a comparison the planner cannot use to
/// walk a partial index instead of the primary key.
const HELD_SQL: &CStr = c"UPDATE sluice.task_run t
   SET status = 'succeeded', output = e.output, finished_at = now(), timeout_at = NULL,
       attempt = t.attempt + 1, worker_id = $1, assigned_at = e.picked, picked_at = e.picked
  FROM unnest($2, $3, $4, $5) AS e(id, attempt, output, picked)
 WHERE t.id = e.id AND t.status::text = 'queued' AND t.attempt = e.attempt - 1
RETURNING t.id, t.attempt";

/// Attempts running in their rows. $1 worker, then one row per attempt: $2 ids, $3 attempts,
/// $4 outputs.
const RUNNING_SQL: &CStr = c"UPDATE sluice.task_run t
   SET status = 'succeeded', output = e.output, finished_at = now(), timeout_at = NULL
  FROM unnest($2, $3, $4) AS e(id, attempt, output)
 WHERE t.id = e.id AND t.attempt = e.attempt AND t.worker_id = $1
   AND t.status::text = 'running'
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
        // A NULL element becomes 0, which no task id or attempt equals (ids start at 1,
        // attempts fetched at 1), so it ends nothing.
        let ids: Vec<i64> = Array::<i64>::from_datum(args[1].value, false)
            .map(|a| a.iter().map(|e| e.unwrap_or(0)).collect())
            .unwrap_or_default();
        let attempts: Vec<i32> = Array::<i32>::from_datum(args[2].value, false)
            .map(|a| a.iter().map(|e| e.unwrap_or(0)).collect())
            .unwrap_or_default();
        let outputs = JsonbElements::of(args[3].value);
        if ids.len() != attempts.len() || ids.len() != outputs.len() {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "task_ids, attempts and outputs must have the same length ({}, {}, {})",
                    ids.len(),
                    attempts.len(),
                    outputs.len()
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

        // An id listed twice is ended by its first listing only (a join of the update with
        // both would pick one of them at random).
        let mut listed = rustc_hash::FxHashSet::default();
        listed.reserve(ids.len());
        let first_listing: Vec<bool> = ids.iter().map(|&id| listed.insert(id)).collect();

        // The claims this worker holds for exactly these attempts, with their pick times.
        let mut held = Vec::new();
        let mut picked = Vec::new();
        for (i, claim) in claims::held_of(&ids, &attempts, worker_id) {
            if first_listing[i] {
                held.push(i);
                picked.push(crate::timestamptz(claim.picked_at));
            }
        }

        let nest_level = spi_plans::connect("sluice.complete_many");

        let mut ended_ids: Vec<i64> = Vec::with_capacity(ids.len());
        let mut ended_attempts: Vec<i32> = Vec::with_capacity(ids.len());
        let worker = pg_sys::Datum::from(worker_id);
        if !held.is_empty() {
            let mut values = [
                worker,
                array_of(held.iter().map(|&i| ids[i])),
                array_of(held.iter().map(|&i| attempts[i])),
                outputs.at(&held),
                picked.into_datum().expect("an array is never NULL"),
            ];
            let types = [
                pg_sys::INT8OID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::JSONBARRAYOID,
                pg_sys::TIMESTAMPTZARRAYOID,
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
        let ended: rustc_hash::FxHashSet<i64> = ended_ids.iter().copied().collect();
        let remaining: Vec<usize> = (0..ids.len())
            .filter(|&i| first_listing[i] && !ended.contains(&ids[i]))
            .collect();
        if !remaining.is_empty() {
            let mut values = [
                worker,
                array_of(remaining.iter().map(|&i| ids[i])),
                array_of(remaining.iter().map(|&i| attempts[i])),
                outputs.at(&remaining),
            ];
            let types = [
                pg_sys::INT8OID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::JSONBARRAYOID,
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

/// An array datum of these values.
fn array_of<T: IntoDatum>(values: impl Iterator<Item = T>) -> pg_sys::Datum {
    values
        .collect::<Vec<T>>()
        .into_datum()
        .expect("an array is never NULL")
}

/// The elements of the outputs argument (`jsonb[]`), deconstructed once, so that the updates
/// get arrays in the order of their other arrays: a subscript of a `jsonb[]` walks it from the
/// start, and one per row made the completion quadratic in the batch.
struct JsonbElements {
    array: pg_sys::Datum,
    elements: *mut pg_sys::Datum,
    nulls: *mut bool,
    len: usize,
}

impl JsonbElements {
    /// # Safety
    /// `datum` is a non-NULL `jsonb[]` of the current call.
    unsafe fn of(datum: pg_sys::Datum) -> JsonbElements {
        unsafe {
            let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
            let mut elements = std::ptr::null_mut();
            let mut nulls = std::ptr::null_mut();
            let mut len = 0;
            pg_sys::deconstruct_array(
                array,
                pg_sys::JSONBOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT as std::ffi::c_char,
                &mut elements,
                &mut nulls,
                &mut len,
            );
            JsonbElements {
                array: pg_sys::Datum::from(array),
                elements,
                nulls,
                len: len as usize,
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// A `jsonb[]` of the elements at these positions, in their order: the argument itself
    /// when that is all of it in order (a drain's batch).
    unsafe fn at(&self, positions: &[usize]) -> pg_sys::Datum {
        if positions.len() == self.len && positions.iter().enumerate().all(|(k, &i)| k == i) {
            return self.array;
        }
        unsafe {
            let mut elements: Vec<pg_sys::Datum> =
                positions.iter().map(|&i| *self.elements.add(i)).collect();
            let mut nulls: Vec<bool> = positions.iter().map(|&i| *self.nulls.add(i)).collect();
            let mut dims = [positions.len() as i32];
            let mut lower_bounds = [1];
            pg_sys::Datum::from(pg_sys::construct_md_array(
                elements.as_mut_ptr(),
                nulls.as_mut_ptr(),
                1,
                dims.as_mut_ptr(),
                lower_bounds.as_mut_ptr(),
                pg_sys::JSONBOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT as std::ffi::c_char,
            ))
        }
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
