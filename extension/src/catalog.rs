//! Catalog lookups shared by the paths that read or write `sluice.task_run` without the
//! executor (`crate::direct_insert`, `crate::arrivals`).

use std::ffi::{c_char, CStr};

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

/// The attribute numbers of `columns` in `heap`, if all are there with the types given; a
/// column given `InvalidOid` must be of an enum type (the task status, whose type is the
/// extension's own).
pub unsafe fn attnums<const N: usize>(
    heap: pg_sys::Relation,
    columns: &[(&CStr, pg_sys::Oid); N],
) -> Option<[i16; N]> {
    unsafe {
        let desc = (*heap).rd_att;
        let attributes = (*desc).attrs.as_slice((*desc).natts as usize);
        let mut found = [0i16; N];
        for attribute in attributes.iter().filter(|a| !a.attisdropped) {
            let name = CStr::from_ptr(attribute.attname.data.as_ptr());
            let Some(i) = columns.iter().position(|(n, _)| *n == name) else {
                continue;
            };
            let type_ok = if columns[i].1 == pg_sys::InvalidOid {
                pg_sys::get_typtype(attribute.atttypid) == pg_sys::TYPTYPE_ENUM as c_char
            } else {
                attribute.atttypid == columns[i].1
            };
            if !type_ok {
                return None;
            }
            found[i] = attribute.attnum;
        }
        found.iter().all(|&a| a > 0).then_some(found)
    }
}
