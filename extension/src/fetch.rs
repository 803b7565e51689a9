//! `sluice.fetch_tasks`: takes the worker's posted assignments and claims them, in Rust.
//!
//! A claim is recorded in shared memory (`crate::claims`) and the row is only read; tasks with
//! rate limits, and any beyond the claim table's room, are claimed by updating the row.
//!
//! Every pickup waits for this call, and a worker with few slots makes it once per handful of
//! tasks. As plpgsql it was two functions (the outer one sets `synchronous_commit` for the
//! transaction, which the inner one's SET clauses would undo on return), two materialized
//! result sets and three SET clauses around the claim: ~35 µs over a bare call with nothing to
//! claim (pgbench, prepared). Here it is one function: the assignments come straight from
//! shared memory (`crate::wake`), and the claim is one plan kept for the session.
//!
//! The claim itself and why it is shaped so are described above the worker functions in
//! sql/api.sql. The planner settings the plpgsql version set per call (no sequential scan,
//! no JIT, one generic plan) are kept: the plan is prepared generic once, and the two others
//! are in effect whenever it is planned or replanned, that is inside the execution.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;

use crate::claims::{self, Claim, NotRecorded};
use crate::posted_read;
use crate::spi_plans::{self, set_guc};
use crate::wake;

const CLAIM_SQL: &CStr = c"UPDATE sluice.task_run t
   SET status = 'running', attempt = t.attempt + 1, worker_id = $1,
       assigned_at = now(), picked_at = now(),
       rate_limited_at = CASE WHEN t.rate_limit_keys IS NOT NULL THEN now()
                              ELSE t.rate_limited_at END,
       timeout_at = now() + coalesce(
           nullif($4[sluice._array_position($2, t.id)], -1) * interval '1 millisecond',
           (SELECT d.execution_timeout FROM sluice.task_definition d
             WHERE d.name = t.task_name))
 WHERE t.id = ANY($2) AND t.attempt = $3[sluice._array_position($2, t.id)] - 1
   AND t.status::text = 'queued'
RETURNING t.id, t.attempt, t.task_name, t.input, t.timeout_at";

/// The read of tasks claimed in memory: what the claim returns, plus whether the task has rate
/// limits (those are claimed in the row) and the time of the read.
const READ_SQL: &CStr = c"SELECT t.id, t.attempt + 1, t.task_name, t.input,
       now() + coalesce(
           nullif($3[sluice._array_position($1, t.id)], -1) * interval '1 millisecond',
           (SELECT d.execution_timeout FROM sluice.task_definition d
             WHERE d.name = t.task_name)),
       t.rate_limit_keys IS NOT NULL, now()
  FROM sluice.task_run t
 WHERE t.id = ANY($1) AND t.attempt = $2[sluice._array_position($1, t.id)] - 1
   AND t.status::text = 'queued'";

thread_local! {
    // Kept for the life of the backend (SPI_keepplan); the plan cache revalidates them when
    // the table or a function they call changes.
    static CLAIM_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static READ_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_fetch_tasks() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `sluice.fetch_tasks(worker_id bigint, max_tasks int) RETURNS TABLE (task_id bigint,
/// attempt int, task_name text, input jsonb, timeout_at timestamptz)`, strict, returning a
/// materialized set.
///
/// # Safety
/// Called by Postgres through the version-1 convention with the two arguments above, in a
/// context that accepts a materialized set.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_fetch_tasks(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = (*fcinfo).args.as_slice(2);
        let worker_id = args[0].value.value() as i64;
        let max_tasks = args[1].value.value() as i32;
        wake::require_scheduler();
        // The result set first: it checks that the caller accepts one.
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let result = (*(*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>()).setResult;

        // The fetch's commit does not wait for the disk (see sql/api.sql); set for the
        // calling transaction, as set_config(..., true) would.
        set_guc(
            c"synchronous_commit",
            c"off",
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );

        let taken = wake::take_assignments(worker_id, max_tasks.max(0) as usize);
        if taken.is_empty() {
            return pg_sys::Datum::from(0);
        }
        let desc = (*(*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>()).setDesc;
        for task in claim(worker_id, &taken) {
            let mut values = [
                pg_sys::Datum::from(task.task_id),
                pg_sys::Datum::from(task.attempt),
                task.task_name,
                task.input,
                pg_sys::Datum::from(task.timeout_at),
            ];
            let mut nulls = [false; 5];
            pg_sys::tuplestore_putvalues(result, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        }
        pg_sys::Datum::from(0)
    }
}

/// A task claimed for the caller: its new attempt. `task_name` (text) and `input` (jsonb) are
/// datums in the caller's memory context.
pub(crate) struct ClaimedTask {
    pub task_id: i64,
    pub attempt: i32,
    pub task_name: pg_sys::Datum,
    pub input: pg_sys::Datum,
    pub timeout_at: pg_sys::TimestampTz,
}

/// Claims assignments taken from the board for this worker (`wake::take_assignments`): those
/// without rate limits in memory while there is room, the others in their rows. Assignments
/// whose task is no longer queued at the attempt before claim nothing. The caller sets
/// `synchronous_commit` for its transaction (see sql/api.sql).
pub(crate) unsafe fn claim(worker_id: i64, taken: &[wake::Posted]) -> Vec<ClaimedTask> {
    unsafe {
        let mut claimed = Vec::with_capacity(taken.len());
        // SPI only where a statement runs: the read by hand is the rule.
        let mut spi_nest_level = None;

        // 1. Read the rows still queued at the attempt before the posted one, and record the
        // claims of those without rate limits in memory.
        let read = match posted_read::read(taken) {
            Some(rows) => queued_rows(worker_id, taken, rows),
            None => {
                spi_nest_level = Some(spi_plans::connect("sluice.fetch_tasks"));
                read_queued(taken)
            }
        };
        let mut in_memory = Vec::with_capacity(read.len());
        let mut in_row: rustc_hash::FxHashSet<i64> = Default::default();
        for row in &read {
            if row.rate_limited {
                in_row.insert(row.claim.task_id);
            } else {
                in_memory.push(row.claim);
            }
        }
        let recorded = claims::record(&in_memory);
        for (claim, outcome) in in_memory.iter().zip(&recorded) {
            match outcome {
                Ok(()) => {}
                // no room: the row takes this claim, as before claims were kept in memory
                Err(NotRecorded::Full) => {
                    in_row.insert(claim.task_id);
                }
                // claimed already (a second post of this attempt): not this worker's
                Err(NotRecorded::Taken) => {}
            }
        }
        for (row, outcome) in read.iter().filter(|r| !r.rate_limited).zip(&recorded) {
            if outcome.is_ok() {
                claimed.push(ClaimedTask {
                    task_id: row.claim.task_id,
                    attempt: row.claim.attempt,
                    task_name: row.task_name,
                    input: row.input,
                    timeout_at: row.claim.timeout_at,
                });
            }
        }

        // 2. Claim the others in their rows.
        if !in_row.is_empty() {
            spi_nest_level.get_or_insert_with(|| spi_plans::connect("sluice.fetch_tasks"));
            let chosen: Vec<&wake::Posted> = taken
                .iter()
                .filter(|p| in_row.contains(&p.task_id))
                .collect();
            let ids: Vec<i64> = chosen.iter().map(|p| p.task_id).collect();
            let attempts: Vec<i32> = chosen.iter().map(|p| p.attempt).collect();
            let timeouts: Vec<i32> = chosen.iter().map(|p| p.execution_timeout_ms).collect();
            let mut values = [
                pg_sys::Datum::from(worker_id),
                ids.into_datum().expect("an array is never NULL"),
                attempts.into_datum().expect("an array is never NULL"),
                timeouts.into_datum().expect("an array is never NULL"),
            ];
            let table = spi_plans::execute(
                &CLAIM_PLAN,
                CLAIM_SQL,
                &[
                    pg_sys::INT8OID,
                    pg_sys::INT8ARRAYOID,
                    pg_sys::INT4ARRAYOID,
                    pg_sys::INT4ARRAYOID,
                ],
                &mut values,
                false,
                pg_sys::SPI_OK_UPDATE_RETURNING,
            );
            let desc = (*table).tupdesc;
            for i in 0..pg_sys::SPI_processed as usize {
                let tuple = *(*table).vals.add(i);
                let column = |n: i32| {
                    let mut is_null = false;
                    let datum = pg_sys::SPI_getbinval(tuple, desc, n, &mut is_null);
                    (!is_null).then_some(datum)
                };
                let (Some(id), Some(attempt), Some(name), Some(input), Some(timeout_at)) =
                    (column(1), column(2), column(3), column(4), column(5))
                else {
                    continue;
                };
                claimed.push(ClaimedTask {
                    task_id: id.value() as i64,
                    attempt: attempt.value() as i32,
                    // Out of SPI's memory, which SPI_finish frees.
                    task_name: pg_sys::SPI_datumTransfer(name, false, -1),
                    input: pg_sys::SPI_datumTransfer(input, false, -1),
                    timeout_at: timeout_at.value() as i64,
                });
            }
        }
        if let Some(nest_level) = spi_nest_level {
            spi_plans::finish(nest_level);
        }
        claimed
    }
}

/// The claims of the rows `posted_read` found: picked now, timing out after the posted
/// execution timeout (which that read requires to be on the board).
fn queued_rows(
    worker_id: i64,
    taken: &[wake::Posted],
    rows: Vec<posted_read::QueuedRow>,
) -> Vec<ReadRow> {
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let timeout_of: rustc_hash::FxHashMap<i64, i32> = taken
        .iter()
        .map(|p| (p.task_id, p.execution_timeout_ms))
        .collect();
    rows.into_iter()
        .map(|row| {
            let timeout_ms = timeout_of.get(&row.task_id).copied().unwrap_or(0);
            ReadRow {
                claim: Claim {
                    task_id: row.task_id,
                    worker_id,
                    picked_at: now,
                    timeout_at: now.saturating_add(i64::from(timeout_ms) * 1000),
                    attempt: row.attempt,
                },
                task_name: row.task_name,
                input: row.input,
                rate_limited: row.rate_limited,
            }
        })
        .collect()
}

/// A row read for a claim in memory. `task_name` and `input` are datums in the caller's
/// memory (copied out of SPI's).
struct ReadRow {
    claim: Claim,
    task_name: pg_sys::Datum,
    input: pg_sys::Datum,
    rate_limited: bool,
}

/// Reads the posted tasks still queued at the attempt before the posted one. Inside SPI.
unsafe fn read_queued(taken: &[wake::Posted]) -> Vec<ReadRow> {
    unsafe {
        let ids: Vec<i64> = taken.iter().map(|p| p.task_id).collect();
        let attempts: Vec<i32> = taken.iter().map(|p| p.attempt).collect();
        let timeouts: Vec<i32> = taken.iter().map(|p| p.execution_timeout_ms).collect();
        let worker_of: std::collections::HashMap<i64, i64> =
            taken.iter().map(|p| (p.task_id, p.worker_id)).collect();
        let mut values = [
            ids.into_datum().expect("an array is never NULL"),
            attempts.into_datum().expect("an array is never NULL"),
            timeouts.into_datum().expect("an array is never NULL"),
        ];
        let table = spi_plans::execute(
            &READ_PLAN,
            READ_SQL,
            &[
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT4ARRAYOID,
            ],
            &mut values,
            true,
            pg_sys::SPI_OK_SELECT,
        );
        let desc = (*table).tupdesc;
        let mut rows = Vec::with_capacity(pg_sys::SPI_processed as usize);
        for i in 0..pg_sys::SPI_processed as usize {
            let tuple = *(*table).vals.add(i);
            let column = |n: i32| {
                let mut is_null = false;
                let datum = pg_sys::SPI_getbinval(tuple, desc, n, &mut is_null);
                (!is_null).then_some(datum)
            };
            let (
                Some(id),
                Some(attempt),
                Some(name),
                Some(input),
                Some(timeout_at),
                Some(limited),
                Some(now),
            ) = (
                column(1),
                column(2),
                column(3),
                column(4),
                column(5),
                column(6),
                column(7),
            )
            else {
                continue;
            };
            let task_id = id.value() as i64;
            rows.push(ReadRow {
                claim: Claim {
                    task_id,
                    worker_id: worker_of.get(&task_id).copied().unwrap_or(0),
                    picked_at: now.value() as i64,
                    timeout_at: timeout_at.value() as i64,
                    attempt: attempt.value() as i32,
                },
                // Out of SPI's memory, which SPI_finish frees.
                task_name: pg_sys::SPI_datumTransfer(name, false, -1),
                input: pg_sys::SPI_datumTransfer(input, false, -1),
                rate_limited: limited.value() != 0,
            });
        }
        rows
    }
}
