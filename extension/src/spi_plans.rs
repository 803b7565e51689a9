//! What the worker functions written in Rust (`crate::fetch`, `crate::complete`) share around
//! SPI: statements prepared once per session, and the planner settings their plpgsql versions
//! set (no sequential scan, no JIT) in effect whenever a kept plan is (re)planned inside an
//! execution.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Where a statement's kept plan lives: one per statement, per backend.
pub(crate) type PlanSlot = std::thread::LocalKey<Cell<pg_sys::SPIPlanPtr>>;

/// Connects to SPI and saves the planner settings for the call; returns what `finish` needs.
pub(crate) unsafe fn connect(function: &str) -> i32 {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("{function}: SPI_connect failed");
        }
        // As the plpgsql versions' SET clauses did, for a (re)planning inside the execution.
        let nest_level = pg_sys::NewGUCNestLevel();
        set_guc(
            c"enable_seqscan",
            c"off",
            pg_sys::GucAction::GUC_ACTION_SAVE,
        );
        set_guc(c"jit", c"off", pg_sys::GucAction::GUC_ACTION_SAVE);
        nest_level
    }
}

/// Restores the planner settings and leaves SPI (its memory, and every tuple it returned, is
/// freed).
pub(crate) unsafe fn finish(nest_level: i32) {
    unsafe {
        pg_sys::AtEOXact_GUC(true, nest_level);
        pg_sys::SPI_finish();
    }
}

/// Runs a kept statement with these parameters (none NULL) and returns its rows. Errors unless
/// SPI answers `expected` (an `SPI_OK_*` code). Inside SPI.
pub(crate) unsafe fn execute(
    slot: &'static PlanSlot,
    sql: &CStr,
    types: &[pg_sys::Oid],
    values: &mut [pg_sys::Datum],
    read_only: bool,
    expected: u32,
) -> *mut pg_sys::SPITupleTable {
    unsafe {
        let plan = kept_plan(slot, sql, types);
        let nulls = vec![b' ' as std::ffi::c_char; values.len()];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), read_only, 0);
        if rc != expected as i32 || pg_sys::SPI_tuptable.is_null() {
            error!(
                "sluice: a statement failed (SPI code {rc}): {}",
                sql.to_string_lossy()
            );
        }
        pg_sys::SPI_tuptable
    }
}

/// A statement's plan, prepared (generic, kept for the session) on first use. Inside SPI.
unsafe fn kept_plan(
    slot: &'static PlanSlot,
    sql: &CStr,
    types: &[pg_sys::Oid],
) -> pg_sys::SPIPlanPtr {
    slot.with(|slot| {
        if slot.get().is_null() {
            let mut types = types.to_vec();
            unsafe {
                let plan = pg_sys::SPI_prepare_cursor(
                    sql.as_ptr(),
                    types.len() as i32,
                    types.as_mut_ptr(),
                    pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
                );
                if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                    error!(
                        "sluice: preparing a statement failed: {}",
                        sql.to_string_lossy()
                    );
                }
                slot.set(plan);
            }
        }
        slot.get()
    })
}

/// Sets a user-settable parameter, as a SET clause (`GUC_ACTION_SAVE`, undone by the
/// surrounding `AtEOXact_GUC`) or `set_config(..., true)` (`GUC_ACTION_LOCAL`) would.
pub(crate) unsafe fn set_guc(name: &CStr, value: &CStr, action: pg_sys::GucAction::Type) {
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
