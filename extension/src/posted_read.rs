//! The claim's read of posted tasks by id, through task_run's primary key, without the
//! executor.
//!
//! Every pickup waits for the worker's claim, and the claim starts by reading the posted rows
//! that are still queued at the attempt before the posted one (`READ_SQL` in crate::fetch).
//! As a kept SPI statement that read was about half of a woken `sluice.await_tasks`'s CPU
//! (perf of the worker backends in the pickup scenario): SPI's connect and the planner
//! settings saved and restored around it, an executor start-up for an index scan with an
//! `= ANY` array key, and a generic plan's subquery. The rows come here from one primary-key
//! lookup each under a fresh snapshot, as the statement had, the same filters checked on each.
//!
//! Used only while the table and its key are what the extension created (task_run's primary
//! key a btree on `id` alone, of the integer operator family); otherwise, and for a posted
//! timeout too long for the board (which the statement looks up in the definition), `read`
//! returns `None` and the claim runs the statement.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::catalog;
use crate::wake::Posted;

/// A posted task whose row is still queued at the attempt before the posted one.
pub struct QueuedRow {
    pub task_id: i64,
    /// The attempt the claim starts (the row's plus one).
    pub attempt: i32,
    /// text and jsonb datums copied into the caller's memory context.
    pub task_name: pg_sys::Datum,
    pub input: pg_sys::Datum,
    pub rate_limited: bool,
}

const COLUMNS: [(&CStr, pg_sys::Oid); 6] = [
    (c"id", pg_sys::INT8OID),
    (c"attempt", pg_sys::INT4OID),
    (c"task_name", pg_sys::TEXTOID),
    (c"input", pg_sys::JSONBOID),
    (c"rate_limit_keys", pg_sys::TEXTARRAYOID),
    // the status enum's type is checked by kind
    (c"status", pg_sys::InvalidOid),
];
const ID: usize = 0;
const ATTEMPT: usize = 1;
const TASK_NAME: usize = 2;
const INPUT: usize = 3;
const RATE_LIMIT_KEYS: usize = 4;
const STATUS: usize = 5;

/// Reads the rows of `taken` still queued at the attempt before the posted one, in the order
/// of `taken`, or `None` if this read cannot run (see the module's comment). Must run in a
/// transaction, outside SPI or with the caller's context current: the datums are copied into
/// `CurrentMemoryContext`.
pub unsafe fn read(taken: &[Posted]) -> Option<Vec<QueuedRow>> {
    if taken.iter().any(|p| p.execution_timeout_ms < 0) {
        return None;
    }
    unsafe {
        let relid = catalog::sluice_relation(c"task_run")?;
        let index_id = catalog::sluice_relation(c"task_run_pkey")?;
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap = pg_sys::table_open(relid, lock);
        let index = pg_sys::index_open(index_id, lock);
        let rows = match catalog::attnums(heap, &COLUMNS) {
            Some(attnums) if index_fits(index, relid, attnums[ID]) => {
                Some(lookup(heap, index, &attnums, taken))
            }
            _ => None,
        };
        // Locks are kept to the end of the transaction, as the executor keeps them.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        rows
    }
}

/// Whether `index` is a valid btree on task_run whose one key is `id`, compared as an integer.
unsafe fn index_fits(index: pg_sys::Relation, relid: pg_sys::Oid, id_attnum: i16) -> bool {
    unsafe {
        let form = &*(*index).rd_index;
        if form.indrelid != relid
            || !form.indisvalid
            || form.indnkeyatts != 1
            || (*(*index).rd_rel).relam != pg_sys::BTREE_AM_OID
        {
            return false;
        }
        form.indkey.values.as_slice(1)[0] == id_attnum
            && *(*index).rd_opfamily == pg_sys::INTEGER_BTREE_FAM_OID
    }
}

unsafe fn lookup(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    attnums: &[i16; COLUMNS.len()],
    taken: &[Posted],
) -> Vec<QueuedRow> {
    unsafe {
        let status_type = {
            let desc = (*heap).rd_att;
            (*desc).attrs.as_slice((*desc).natts as usize)[attnums[STATUS] as usize - 1].atttypid
        };
        let queued = catalog::queued_status(status_type);
        // A fresh snapshot, as the SPI statement took one (READ COMMITTED).
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
        let scan = pg_sys::index_beginscan(heap, index, snapshot, 1, 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let last_attnum = attnums.iter().copied().max().unwrap_or(1) as i32;
        let mut rows = Vec::with_capacity(taken.len());
        for posted in taken {
            let mut key = pg_sys::ScanKeyData::default();
            pg_sys::ScanKeyInit(
                &mut key,
                1,
                pg_sys::BTEqualStrategyNumber as u16,
                pg_sys::RegProcedure::from(pg_sys::F_INT8EQ),
                pg_sys::Datum::from(posted.task_id),
            );
            pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
            // At most one version is visible to the snapshot; the loop ends the scan.
            while pg_sys::index_getnext_slot(
                scan,
                pg_sys::ScanDirection::ForwardScanDirection,
                slot,
            ) {
                pg_sys::slot_getsomeattrs(slot, last_attnum);
                let value = |column: usize| {
                    let i = attnums[column] as usize - 1;
                    let isnull = *(*slot).tts_isnull.add(i);
                    (!isnull).then(|| *(*slot).tts_values.add(i))
                };
                let (Some(id), Some(attempt), Some(status), Some(name), Some(input)) = (
                    value(ID),
                    value(ATTEMPT),
                    value(STATUS),
                    value(TASK_NAME),
                    value(INPUT),
                ) else {
                    continue;
                };
                let attempt = attempt.value() as i32;
                if id.value() as i64 != posted.task_id
                    || status != queued
                    || attempt != posted.attempt - 1
                {
                    continue;
                }
                rows.push(QueuedRow {
                    task_id: posted.task_id,
                    attempt: attempt + 1,
                    // The slot's values point into the buffer, which is released: copied,
                    // and detoasted while the snapshot that can read the toast is held.
                    task_name: copy(name),
                    input: copy(input),
                    rate_limited: value(RATE_LIMIT_KEYS).is_some(),
                });
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        rows
    }
}

/// A varlena datum copied into `CurrentMemoryContext`, detoasted.
unsafe fn copy(value: pg_sys::Datum) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(
            value.cast_mut_ptr::<pg_sys::varlena>(),
        ))
    }
}
