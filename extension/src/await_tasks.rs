//! `sluice.await_tasks`: an idle worker's connection waits in Postgres for its next
//! assignments, and claims them, instead of waiting for a notification and then fetching.
//!
//! A notification costs the scheduler's tick an xid, a lock on the notification queue and a
//! signal to every listening backend of the database, and the worker a round trip after it
//! (the notification, then its fetch). A worker with nothing in flight instead calls this
//! procedure: the scheduler sets the waiting backend's latch once the tick that posted to the
//! worker commits (`crate::wake::post_assignments`), and the procedure claims the tasks as
//! `sluice.fetch_tasks` would and returns them, one answer in all.
//!
//! It is a procedure so that it can commit the transaction its CALL started before it waits:
//! the wait holds no snapshot, so an idle worker never holds back vacuum's horizon.

use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgSqlErrorCode, PgTryBuilder};

use crate::fetch;
use crate::spi_plans::set_guc;
use crate::wake::{self, Registration};

/// With the waiting list full, the board is looked at this often instead.
const FULL_LIST_POLL: Duration = Duration::from_millis(10);
/// The client's connection is checked at least this often during a wait: a backend whose
/// client went away ends then, not when a long wait would have.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

unsafe extern "C" {
    /// libpq/pqcomm.c (what `client_connection_check_interval` uses): false once the client's
    /// socket is closed. Does not raise errors.
    fn pq_check_connection() -> bool;
}

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_await_tasks() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `CALL sluice.await_tasks(worker_id bigint, max_tasks int, timeout_ms int, OUT task_ids
/// bigint[], OUT attempts int[], OUT task_names text[], OUT inputs jsonb[], OUT timeouts_at
/// timestamptz[])`: once assignments are posted for the worker, or after `timeout_ms` (capped
/// below `statement_timeout`), claims up to `max_tasks` of them and returns them as arrays.
///
/// # Safety
/// Called by Postgres through the version-1 convention as a procedure with the arguments above.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_await_tasks(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = (*fcinfo).args.as_slice(3);
        if args[0].isnull || args[1].isnull || args[2].isnull {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "sluice.await_tasks: worker_id, max_tasks and timeout_ms must not be NULL"
            );
        }
        let worker_id = args[0].value.value() as i64;
        let max_tasks = args[1].value.value() as i32;
        let timeout_ms = args[2].value.value() as i32;
        if timeout_ms < 0 {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("sluice.await_tasks: timeout_ms must not be negative, got {timeout_ms}")
            );
        }
        wake::require_scheduler();
        if !non_atomic(fcinfo) {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_TERMINATION,
                "sluice.await_tasks cannot run inside a transaction block",
                "It commits the transaction its CALL started, so that it waits without holding a \
                 snapshot; CALL it on its own."
            );
        }
        // The result's row type, before the commit below (it is looked up in the catalogs).
        let mut desc: pg_sys::TupleDesc = std::ptr::null_mut();
        if pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut desc)
            != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE
        {
            error!("sluice.await_tasks: its OUT parameters are not a row type");
        }
        let desc = pg_sys::BlessTupleDesc(desc);

        // The CALL's transaction has done nothing; committing it drops the portal's snapshot.
        // The wait then runs in a fresh transaction that takes none.
        commit_and_start_afresh();

        let deadline = Instant::now() + wait_limit(timeout_ms);
        let ended = PgTryBuilder::new(|| wait(worker_id, deadline))
            .finally(wake::unregister_waiter)
            .execute();
        // The claims take their times from now(), the transaction's start: not the wait's.
        commit_and_start_afresh();
        reload_config_if_pending();

        // The claims' commit does not wait for the disk, as sluice.fetch_tasks' (sql/api.sql).
        set_guc(
            c"synchronous_commit",
            c"off",
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );
        let max_tasks = if ended { 0 } else { max_tasks.max(0) as usize };
        let taken = wake::take_assignments(worker_id, max_tasks);
        let claimed = if taken.is_empty() {
            Vec::new()
        } else {
            fetch::claim(worker_id, &taken)
        };
        result_row(desc, &claimed)
    }
}

/// The OUT parameters as one row of arrays.
unsafe fn result_row(desc: pg_sys::TupleDesc, claimed: &[fetch::ClaimedTask]) -> pg_sys::Datum {
    unsafe {
        let column = |datums: Vec<pg_sys::Datum>,
                      element: pg_sys::Oid,
                      len: i16,
                      by_value: bool,
                      align: u8| {
            let mut datums = datums;
            pg_sys::Datum::from(pg_sys::construct_array(
                datums.as_mut_ptr(),
                datums.len() as i32,
                element,
                len as i32,
                by_value,
                align as std::ffi::c_char,
            ))
        };
        let mut values = [
            column(
                claimed
                    .iter()
                    .map(|t| pg_sys::Datum::from(t.task_id))
                    .collect(),
                pg_sys::INT8OID,
                8,
                true,
                pg_sys::TYPALIGN_DOUBLE,
            ),
            column(
                claimed
                    .iter()
                    .map(|t| pg_sys::Datum::from(t.attempt))
                    .collect(),
                pg_sys::INT4OID,
                4,
                true,
                pg_sys::TYPALIGN_INT,
            ),
            column(
                claimed.iter().map(|t| t.task_name).collect(),
                pg_sys::TEXTOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT,
            ),
            column(
                claimed.iter().map(|t| t.input).collect(),
                pg_sys::JSONBOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT,
            ),
            column(
                claimed
                    .iter()
                    .map(|t| pg_sys::Datum::from(t.timeout_at))
                    .collect(),
                pg_sys::TIMESTAMPTZOID,
                8,
                true,
                pg_sys::TYPALIGN_DOUBLE,
            ),
        ];
        let mut nulls = [false; 5];
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::HeapTupleHeaderGetDatum((*tuple).t_data)
    }
}

/// A normal backend rereads the configuration between statements; this one may stay in the
/// wait for long, and its claims follow `sluice.claims_in_memory`.
fn reload_config_if_pending() {
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Commits the current transaction and starts a new one. Only in a non-atomic CALL.
unsafe fn commit_and_start_afresh() {
    unsafe {
        pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32);
        pg_sys::SPI_commit();
        pg_sys::SPI_finish();
    }
}

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_end_wait() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `sluice.end_wait(worker_id bigint) RETURNS boolean`, strict: ends the worker's
/// `sluice.await_tasks` wait, which then returns without claiming; whether one was waiting.
///
/// # Safety
/// Called by Postgres through the version-1 convention with the argument above.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_end_wait(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let worker_id = (*fcinfo).args.as_slice(1)[0].value.value() as i64;
        wake::require_scheduler();
        pg_sys::Datum::from(wake::end_wait(worker_id))
    }
}

/// Whether the procedure was called where it may end the transaction (CALL outside a
/// transaction block).
unsafe fn non_atomic(fcinfo: pg_sys::FunctionCallInfo) -> bool {
    unsafe {
        let context = (*fcinfo).context;
        !context.is_null()
            && (*context).type_ == pg_sys::NodeTag::T_CallContext
            && !(*context.cast::<pg_sys::CallContext>()).atomic
    }
}

/// How long to wait at most: the caller's timeout, kept below `statement_timeout` so that an
/// idle wait is not reported as a cancelled statement.
fn wait_limit(timeout_ms: i32) -> Duration {
    let requested = Duration::from_millis(timeout_ms as u64);
    let statement_timeout = unsafe { pg_sys::StatementTimeout };
    if statement_timeout > 0 {
        let room = Duration::from_millis(statement_timeout as u64).mul_f64(0.9);
        requested.min(room)
    } else {
        requested
    }
}

/// Waits until assignments are posted for the worker or the deadline passes; returns true if
/// `sluice.end_wait` ended the wait instead (nothing is to be claimed then).
fn wait(worker_id: i64, deadline: Instant) -> bool {
    loop {
        let registration = wake::register_waiter(worker_id);
        match registration {
            Registration::Posted => return false,
            Registration::Ended => return true,
            Registration::Registered | Registration::Full => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        let nap = match registration {
            Registration::Full => remaining.min(FULL_LIST_POLL),
            _ => remaining.min(CONNECTION_CHECK),
        };
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                nap.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            if !pq_check_connection() {
                // As ProcessInterrupts does for client_connection_check_interval: the
                // interrupt check below ends the session (FATAL, connection to client lost).
                pg_sys::ClientConnectionLost = 1;
                pg_sys::InterruptPending = 1;
            }
        }
        // Query cancel, statement timeout, termination.
        pgrx::check_for_interrupts!();
        reload_config_if_pending();
    }
}
