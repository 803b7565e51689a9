//! The scheduler's read of new arrivals, as an index scan run without the executor.
//!
//! Every tick that a commit woke reads the queued tasks after the arrivals cursor: the rows
//! of `task_run_unfinished_idx` past `(run_at, id)`, runnable by now, in index order. As a
//! prepared SPI statement that read was the largest part of the tick each pickup waits for:
//! 77 µs on average for a tick that read and assigned one task (of ~220 µs; an executor
//! start-up for the Limit and Index Scan nodes and pgrx's per-value accessors), measured by
//! timing the tick's phases in the pickup scenario.
//!
//! Here the same rows come from `index_beginscan` with the row comparison
//! `(run_at, id) > (cursor)` as one scan key (as the executor builds it for that SQL), under a
//! fresh snapshot as the statement had, and the columns are read from the slot. The index is
//! used only while it is what the extension created: a btree whose two keys are `run_at` and
//! `id`, ascending; the row filters (`finished_at IS NULL`, `status = 'queued'`) are checked
//! here on every row, not trusted to the index's predicate. If the table or the index is not
//! as expected, `read` returns `None` and the scheduler runs the SQL statement instead.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::FromDatum;

use crate::catalog;
use crate::queue::Micros;

/// One queued task as the arrivals read returns it (the SQL statement's columns).
#[derive(Debug)]
pub struct ArrivalRow {
    pub task_id: i64,
    pub task_name: String,
    pub priority: i32,
    pub run_at: Micros,
    pub attempt: i32,
    pub concurrency_key: Option<String>,
    pub rate_limit_keys: Option<Vec<String>>,
    pub rate_limit_units: Option<Vec<i32>>,
    pub schedule_deadline: Option<Micros>,
}

/// The columns read, with their expected types (the status enum's is checked by kind).
const COLUMNS: [(&CStr, pg_sys::Oid); 11] = [
    (c"id", pg_sys::INT8OID),
    (c"task_name", pg_sys::TEXTOID),
    (c"priority", pg_sys::INT4OID),
    (c"run_at", pg_sys::TIMESTAMPTZOID),
    (c"attempt", pg_sys::INT4OID),
    (c"concurrency_key", pg_sys::TEXTOID),
    (c"rate_limit_keys", pg_sys::TEXTARRAYOID),
    (c"rate_limit_units", pg_sys::INT4ARRAYOID),
    (c"schedule_deadline", pg_sys::TIMESTAMPTZOID),
    (c"status", pg_sys::InvalidOid),
    (c"finished_at", pg_sys::TIMESTAMPTZOID),
];
const ID: usize = 0;
const TASK_NAME: usize = 1;
const PRIORITY: usize = 2;
const RUN_AT: usize = 3;
const ATTEMPT: usize = 4;
const CONCURRENCY_KEY: usize = 5;
const RATE_LIMIT_KEYS: usize = 6;
const RATE_LIMIT_UNITS: usize = 7;
const SCHEDULE_DEADLINE: usize = 8;
const STATUS: usize = 9;
const FINISHED_AT: usize = 10;

/// access/nbtree.h: a btree column's three-way comparison support function.
const BTORDER_PROC: u16 = 1;

/// Up to `limit` queued tasks placed after `after` in the arrivals index and runnable at
/// `until`, in index order; `None` when the index scan cannot be used (then run the SQL).
/// Must run inside a transaction.
pub fn read(after: (Micros, i64), until: Micros, limit: usize) -> Option<Vec<ArrivalRow>> {
    unsafe {
        let relid = catalog::sluice_relation(c"task_run")?;
        let index_id = catalog::sluice_relation(c"task_run_unfinished_idx")?;
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap = pg_sys::table_open(relid, lock);
        let index = pg_sys::index_open(index_id, lock);
        let rows = match catalog::attnums(heap, &COLUMNS) {
            Some(attnums) if index_fits(index, relid, &attnums) => {
                Some(scan(heap, index, &attnums, after, until, limit))
            }
            _ => None,
        };
        // Locks are kept to the end of the transaction, as the executor keeps them.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        rows
    }
}

/// Whether `index` is a valid btree on task_run whose keys are (run_at, id), both ascending.
unsafe fn index_fits(index: pg_sys::Relation, relid: pg_sys::Oid, attnums: &[i16]) -> bool {
    unsafe {
        let form = &*(*index).rd_index;
        if form.indrelid != relid
            || !form.indisvalid
            || form.indnkeyatts != 2
            || (*(*index).rd_rel).relam != pg_sys::BTREE_AM_OID
        {
            return false;
        }
        let keys = form.indkey.values.as_slice(2);
        let options = std::slice::from_raw_parts((*index).rd_indoption, 2);
        keys == [attnums[RUN_AT], attnums[ID]] && options == [0, 0]
    }
}

unsafe fn scan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    attnums: &[i16; COLUMNS.len()],
    after: (Micros, i64),
    until: Micros,
    limit: usize,
) -> Vec<ArrivalRow> {
    unsafe {
        let status_type = {
            let desc = (*heap).rd_att;
            (*desc).attrs.as_slice((*desc).natts as usize)[attnums[STATUS] as usize - 1].atttypid
        };
        let queued = catalog::queued_status(status_type);
        // `(run_at, id) > ($1, $2)` as the executor puts a row comparison to a btree: a
        // header key pointing at one member key per column, the last marked as the end. A
        // member's function is the column's three-way comparison support function (btree
        // checks a row comparison with it), not the `>` operator's: with `timestamptz_gt`,
        // an earlier run_at read as "equal" and the id decided, so a cursor rewound to (t, min)
        // returned every earlier task again. The members must outlive the scan (the scan
        // keeps the pointer).
        let compare = |column: i16| pg_sys::index_getprocid(index, column, BTORDER_PROC);
        let mut members: [pg_sys::ScanKeyData; 2] = Default::default();
        pg_sys::ScanKeyEntryInitialize(
            &mut members[0],
            pg_sys::SK_ROW_MEMBER as i32,
            1,
            pg_sys::BTGreaterStrategyNumber as u16,
            pg_sys::TIMESTAMPTZOID,
            pg_sys::InvalidOid,
            compare(1),
            pg_sys::Datum::from(after.0),
        );
        pg_sys::ScanKeyEntryInitialize(
            &mut members[1],
            (pg_sys::SK_ROW_MEMBER | pg_sys::SK_ROW_END) as i32,
            2,
            pg_sys::BTGreaterStrategyNumber as u16,
            pg_sys::INT8OID,
            pg_sys::InvalidOid,
            compare(2),
            pg_sys::Datum::from(after.1),
        );
        let mut header = pg_sys::ScanKeyData {
            sk_flags: pg_sys::SK_ROW_HEADER as i32,
            sk_attno: 1,
            sk_strategy: pg_sys::BTGreaterStrategyNumber as u16,
            sk_argument: pg_sys::Datum::from(members.as_mut_ptr()),
            ..Default::default()
        };
        // A fresh snapshot, as each SPI statement took one (READ COMMITTED).
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
        let scan = pg_sys::index_beginscan(heap, index, snapshot, 1, 0);
        pg_sys::index_rescan(scan, &mut header, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let last_attnum = attnums.iter().copied().max().unwrap_or(1) as i32;
        let mut rows = Vec::new();
        while rows.len() < limit
            && pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot)
        {
            pg_sys::slot_getsomeattrs(slot, last_attnum);
            let value = |column: usize| {
                let i = attnums[column] as usize - 1;
                let isnull = *(*slot).tts_isnull.add(i);
                (*(*slot).tts_values.add(i), isnull)
            };
            let (run_at, run_at_null) = value(RUN_AT);
            let run_at = run_at.value() as Micros;
            // In index order: nothing after this is runnable yet.
            if run_at_null || run_at > until {
                break;
            }
            let (status, _) = value(STATUS);
            if !value(FINISHED_AT).1 || status != queued {
                continue;
            }
            let int4 = |column: usize| {
                let (datum, isnull) = value(column);
                (!isnull).then(|| datum.value() as i32)
            };
            let (Some(priority), Some(attempt)) = (int4(PRIORITY), int4(ATTEMPT)) else {
                continue;
            };
            let (id, id_null) = value(ID);
            let (name, name_null) = value(TASK_NAME);
            let Some(task_name) = String::from_datum(name, name_null) else {
                continue;
            };
            if id_null {
                continue;
            }
            let (key, key_null) = value(CONCURRENCY_KEY);
            let (keys, keys_null) = value(RATE_LIMIT_KEYS);
            let (units, units_null) = value(RATE_LIMIT_UNITS);
            let (deadline, deadline_null) = value(SCHEDULE_DEADLINE);
            rows.push(ArrivalRow {
                task_id: id.value() as i64,
                task_name,
                priority,
                run_at,
                attempt,
                concurrency_key: String::from_datum(key, key_null),
                rate_limit_keys: Vec::<String>::from_datum(keys, keys_null),
                rate_limit_units: Vec::<i32>::from_datum(units, units_null),
                schedule_deadline: (!deadline_null).then(|| deadline.value() as Micros),
            });
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        rows
    }
}
