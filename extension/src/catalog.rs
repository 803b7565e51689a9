//! Catalog lookups shared by the paths that read or write `sluice.task_run` without the
//! executor (`crate::direct_insert`, `crate::arrivals`).

use std::ffi::CStr;

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    // Passed to DirectFunctionCall2Coll, which needs the C symbol itself.
    fn enum_in(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
}

/// The oid of relation `name` in schema `sluice`, if both exist.
pub fn sluice_relation(name: &CStr) -> Option<pg_sys::Oid> {
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"sluice".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let relid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
        (relid != pg_sys::InvalidOid).then_some(relid)
    }
}

/// `'queued'` of the task status enum `status_type` (an enum value is its label's oid).
pub fn queued_status(status_type: pg_sys::Oid) -> pg_sys::Datum {
    unsafe {
        pg_sys::DirectFunctionCall2Coll(
            Some(enum_in),
            pg_sys::InvalidOid,
            pg_sys::Datum::from(c"queued".as_ptr()),
            pg_sys::Datum::from(status_type),
        )
    }
}
