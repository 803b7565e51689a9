//! `sluice.await_assignments`: an idle worker's connection waits in Postgres for its next
//! assignments instead of for a notification.
//!
//! A notification costs the scheduler's tick an xid, a lock on the notification queue and a
//! signal to every listening backend of the database, and the worker a round trip after it
//! (the notification, then its fetch). A worker with nothing in flight instead calls this
//! procedure with its fetch pipelined behind it: the scheduler sets the waiting backend's
//! latch once the tick that posted to the worker commits (`crate::wake::post_assignments`),
//! the call returns and the fetch already queued on the connection runs at once.
//!
//! It is a procedure so that it can commit the transaction its CALL started before it waits:
//! the wait holds no snapshot, so an idle worker never holds back vacuum's horizon.

use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgSqlErrorCode, PgTryBuilder};

use crate::wake::{self, Registration};

/// With the waiting list full, the board is looked at this often instead.
const FULL_LIST_POLL: Duration = Duration::from_millis(10);

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_await_assignments() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `CALL sluice.await_assignments(worker_id bigint, timeout_ms int)`: returns once
/// assignments are posted for the worker, or after `timeout_ms` (capped below
/// `statement_timeout`), or on the latch of an interrupt that ends the statement.
///
/// # Safety
/// Called by Postgres through the version-1 convention as a procedure with the two arguments
/// above.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_await_assignments(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = (*fcinfo).args.as_slice(2);
        if args[0].isnull || args[1].isnull {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "sluice.await_assignments: worker_id and timeout_ms must not be NULL"
            );
        }
        let worker_id = args[0].value.value() as i64;
        let timeout_ms = args[1].value.value() as i32;
        if timeout_ms < 0 {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "sluice.await_assignments: timeout_ms must not be negative, got {timeout_ms}"
                )
            );
        }
        wake::require_scheduler();
        if !non_atomic(fcinfo) {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_TERMINATION,
                "sluice.await_assignments cannot run inside a transaction block",
                "It commits the transaction its CALL started, so that it waits without holding a \
                 snapshot; CALL it on its own."
            );
        }
        // The CALL's transaction has done nothing; committing it drops the portal's snapshot.
        // The wait then runs in a fresh transaction that takes none.
        pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32);
        pg_sys::SPI_commit();
        pg_sys::SPI_finish();

        let deadline = Instant::now() + wait_limit(timeout_ms);
        PgTryBuilder::new(|| wait(worker_id, deadline))
            .finally(|| wake::unregister_waiter())
            .execute();
        pg_sys::Datum::from(0)
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

fn wait(worker_id: i64, deadline: Instant) {
    loop {
        let registration = wake::register_waiter(worker_id);
        if registration == Registration::Posted {
            return;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return;
        }
        let nap = match registration {
            Registration::Full => remaining.min(FULL_LIST_POLL),
            _ => remaining,
        };
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                nap.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        // Query cancel, statement timeout, termination.
        pgrx::check_for_interrupts!();
    }
}
