//! `sluice.enqueue`: the common case in Rust, everything else in plpgsql.
//!
//! The common case is a task without an idempotency key whose definition has no flow control
//! (no concurrency key, no rate limits): one INSERT with the definition's priority and schedule
//! timeout from the per-session cache (`crate::definition_cache`), and a wake-up of the
//! scheduler at commit. As a plpgsql function that took ~27 µs per call on top of the INSERT
//! itself (setting up the function, three more statements and their expression evaluations,
//! the defaults passed through an array), about as much as the INSERT's own executor start.
//! Here the row is written directly (`crate::direct_insert`) while task_run is as the extension
//! made it, or else by one INSERT plan kept for the session; either way the arguments go in as
//! they came: the input is never parsed or copied.
//!
//! Everything else (an idempotency key, flow control, a NULL or unknown name, a NULL input, a
//! session whose cache is bypassed) goes to `sluice._enqueue_general`, which raises the errors.
//! They reach the caller through pgrx's guard, which re-raises them with their SQLSTATE,
//! message, detail and hint (the tests branch on those) but without the plpgsql CONTEXT lines;
//! with RUST_BACKTRACE set in the server's environment, pgrx adds a Rust backtrace to the
//! detail.
//!
//! The function is declared in sql/api.sql (`LANGUAGE c`), not through `#[pg_extern]`: taking
//! the input as `JsonB` would convert it to a `serde_json::Value` and back on every call.

use std::cell::Cell;
use std::ffi::{c_char, CStr};

use pgrx::prelude::*;
use pgrx::{pg_sys, FromDatum, IntoDatum};

use crate::{definition_cache, direct_insert, wake};

const INSERT_SQL: &CStr =
    c"INSERT INTO sluice.task_run (task_name, priority, input, run_at, schedule_deadline)
     VALUES ($1, $2, $3, $4, $4 + $5)
     RETURNING id";
// Passed to DirectFunctionCall2Coll, which needs the C symbol itself.
unsafe extern "C-unwind" {
    fn timestamptz_pl_interval(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
}

const GENERAL_SQL: &CStr = c"SELECT sluice._enqueue_general($1, $2, $3, $4, $5)";

thread_local! {
    // Plans kept for the life of the backend (SPI_keepplan); the plan cache revalidates them
    // when the table or the function changes.
    static INSERT_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static GENERAL_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_enqueue() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `sluice.enqueue(task text, input jsonb, run_at timestamptz, priority int,
/// idempotency_key text) RETURNS bigint` (not strict; the defaults are in its declaration).
///
/// # Safety
/// Called by Postgres through the version-1 convention with the five arguments above.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_enqueue(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let args = unsafe { (*fcinfo).args.as_slice((*fcinfo).nargs as usize) };
    assert_eq!(args.len(), 5, "sluice.enqueue takes five arguments");
    let [task, input, run_at, priority, idempotency_key] = [0, 1, 2, 3, 4].map(|i| args[i]);
    let plain = if task.isnull || input.isnull || !idempotency_key.isnull {
        None
    } else {
        let name = unsafe { <&str>::from_datum(task.value, false) };
        name.and_then(definition_cache::plain_defaults).flatten()
    };
    let Some(defaults) = plain else {
        // The general path: same arguments, same order.
        let values = [task, input, run_at, priority, idempotency_key];
        return match execute(&GENERAL_PLAN, GENERAL_SQL, &GENERAL_TYPES, &values) {
            Some(id) => id,
            None => {
                unsafe { (*fcinfo).isnull = true };
                pg_sys::Datum::from(0)
            }
        };
    };
    wake::require_scheduler();
    let start_at = if run_at.isnull {
        unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
    } else {
        run_at.value.value() as pg_sys::TimestampTz
    };
    let priority = if priority.isnull {
        pg_sys::Datum::from(defaults.priority)
    } else {
        priority.value
    };
    let schedule_timeout = defaults
        .schedule_timeout
        .into_datum()
        .expect("an interval is never NULL");
    // Direct when task_run is as the extension made it (crate::direct_insert); else through
    // the executor, which then enforces what a user added to the table.
    let row = direct_insert::PlainRow {
        task_name: task.value,
        priority,
        input: input.value,
        run_at: start_at,
        schedule_deadline: unsafe {
            // `$4 + $5` in INSERT_SQL: the session's time zone decides what a day is.
            pg_sys::DirectFunctionCall2Coll(
                Some(timestamptz_pl_interval),
                pg_sys::InvalidOid,
                pg_sys::Datum::from(start_at),
                schedule_timeout,
            )
            .value() as pg_sys::TimestampTz
        },
    };
    let id = match direct_insert::insert(&row) {
        Some(id) => pg_sys::Datum::from(id),
        None => {
            let values = [
                task,
                not_null(priority),
                input,
                not_null(pg_sys::Datum::from(start_at)),
                not_null(schedule_timeout),
            ];
            execute(&INSERT_PLAN, INSERT_SQL, &INSERT_TYPES, &values)
                .expect("the INSERT returns the new task's id")
        }
    };
    wake::wake_at_commit(Some(start_at));
    id
}

const INSERT_TYPES: [pg_sys::Oid; 5] = [
    pg_sys::TEXTOID,
    pg_sys::INT4OID,
    pg_sys::JSONBOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::INTERVALOID,
];
const GENERAL_TYPES: [pg_sys::Oid; 5] = [
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
];

fn not_null(value: pg_sys::Datum) -> pg_sys::NullableDatum {
    pg_sys::NullableDatum {
        value,
        isnull: false,
    }
}

/// Runs a one-row statement through a plan kept in `slot` (prepared on first use) and returns
/// its first column, a bigint (by value, so it outlives SPI_finish). Plain SPI rather than
/// pgrx's `SpiClient` (which the scheduler uses): the arguments go in as the datums the caller
/// passed, and the one value read back needs none of its per-value guarded accessors, which
/// showed in the scheduler's profiles.
fn execute(
    slot: &'static std::thread::LocalKey<Cell<pg_sys::SPIPlanPtr>>,
    sql: &CStr,
    types: &[pg_sys::Oid; 5],
    values: &[pg_sys::NullableDatum; 5],
) -> Option<pg_sys::Datum> {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("sluice.enqueue: SPI_connect failed");
        }
        let mut plan = slot.with(Cell::get);
        if plan.is_null() {
            let mut argtypes = *types;
            let prepared = pg_sys::SPI_prepare(sql.as_ptr(), 5, argtypes.as_mut_ptr());
            if prepared.is_null() || pg_sys::SPI_keepplan(prepared) != 0 {
                error!("sluice.enqueue: preparing its statement failed");
            }
            slot.with(|s| s.set(prepared));
            plan = prepared;
        }
        let mut datums = values.map(|v| v.value);
        let nulls = values.map(|v| if v.isnull { b'n' } else { b' ' } as c_char);
        let rc = pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1);
        if rc < 0 || pg_sys::SPI_processed != 1 || pg_sys::SPI_tuptable.is_null() {
            error!("sluice.enqueue: its statement failed (SPI code {rc})");
        }
        let table = pg_sys::SPI_tuptable;
        let mut isnull = false;
        let value = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
        pg_sys::SPI_finish();
        (!isnull).then_some(value)
    }
}
