//! `sluice.fetch_tasks`: takes the worker's posted assignments and claims them, in Rust.
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

thread_local! {
    // Kept for the life of the backend (SPI_keepplan); the plan cache revalidates it when the
    // table or a function it calls changes.
    static CLAIM_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
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
        // In the function's memory context: they outlive SPI_finish.
        let ids: Vec<i64> = taken.iter().map(|p| p.task_id).collect();
        let attempts: Vec<i32> = taken.iter().map(|p| p.attempt).collect();
        let timeouts: Vec<i32> = taken.iter().map(|p| p.execution_timeout_ms).collect();
        let mut values = [
            pg_sys::Datum::from(worker_id),
            ids.into_datum().expect("an array is never NULL"),
            attempts.into_datum().expect("an array is never NULL"),
            timeouts.into_datum().expect("an array is never NULL"),
        ];
        let nulls = [b' ' as std::ffi::c_char; 4];

        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("sluice.fetch_tasks: SPI_connect failed");
        }
        let plan = claim_plan();
        // As the plpgsql version's SET clauses did, for a (re)planning inside the execution.
        let nest_level = pg_sys::NewGUCNestLevel();
        set_guc(
            c"enable_seqscan",
            c"off",
            pg_sys::GucAction::GUC_ACTION_SAVE,
        );
        set_guc(c"jit", c"off", pg_sys::GucAction::GUC_ACTION_SAVE);
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        pg_sys::AtEOXact_GUC(true, nest_level);
        if rc != pg_sys::SPI_OK_UPDATE_RETURNING as i32 || pg_sys::SPI_tuptable.is_null() {
            error!("sluice.fetch_tasks: the claim failed (SPI code {rc})");
        }
        let table = pg_sys::SPI_tuptable;
        for i in 0..pg_sys::SPI_processed as usize {
            // Copied into the result set's own memory.
            pg_sys::tuplestore_puttuple(result, *(*table).vals.add(i));
        }
        pg_sys::SPI_finish();
        pg_sys::Datum::from(0)
    }
}

/// The claim's plan, prepared (generic, kept) on first use. Inside SPI.
unsafe fn claim_plan() -> pg_sys::SPIPlanPtr {
    CLAIM_PLAN.with(|slot| {
        if slot.get().is_null() {
            let mut types = [
                pg_sys::INT8OID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT4ARRAYOID,
            ];
            unsafe {
                let plan = pg_sys::SPI_prepare_cursor(
                    CLAIM_SQL.as_ptr(),
                    4,
                    types.as_mut_ptr(),
                    pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
                );
                if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                    error!("sluice.fetch_tasks: preparing the claim failed");
                }
                slot.set(plan);
            }
        }
        slot.get()
    })
}

/// Sets a user-settable parameter, as a SET clause (`GUC_ACTION_SAVE`, undone by the
/// surrounding `AtEOXact_GUC`) or `set_config(..., true)` (`GUC_ACTION_LOCAL`) would.
unsafe fn set_guc(name: &CStr, value: &CStr, action: pg_sys::GucAction::Type) {
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}
