//! The plain enqueue's row, written without the executor.
//!
//! A plain `sluice.enqueue` (see `crate::enqueue`) is one INSERT of a row whose values are all
//! known: five from the caller and the definition, the rest defaults or NULL. Through SPI,
//! setting up that INSERT cost more than writing the row: executor start-up builds a
//! 27-column projection and the column defaults, opens the five indexes and prepares the
//! partial ones' predicates, and compiles the check constraint from its stored text, on every
//! call. In a loop of 20,000 calls the INSERT took 12-13.6 µs a row against 5.2 µs for the
//! bare 5-column INSERT the benchmark compares with (benches/README.md).
//!
//! This writes the row as COPY does: the tuple formed here, `heap_insert`, then the index
//! entries through `ExecInsertIndexTuples` (which still checks the primary key's uniqueness and
//! each partial index's predicate). It does only what the executor would do for this table
//! as the extension creates it, so it is used only while the table still is that:
//!   - a plain heap table, without row-level security and without insert triggers (foreign
//!     keys are triggers too);
//!   - no column beyond the ones the extension knows, no generated column, no default on a
//!     column this leaves NULL, no NOT NULL column it leaves NULL;
//!   - the one check constraint the extension declares (the row here satisfies it: a queued
//!     task with no `finished_at`).
//!
//! Anything else (a user's trigger or policy on task_run, an added constraint), any caller
//! without the table-level INSERT and SELECT privileges and any read-only transaction takes
//! the SPI path, which enforces all of it and
//! raises the errors. The shape is checked once per session and again after any relcache
//! invalidation of the table (every ALTER TABLE, CREATE TRIGGER, CREATE POLICY, GRANT sends
//! one). Like the executor, it takes the identity column's value without checking the
//! sequence's privileges.
//!
//! What differs from the SPI path: hooks on the executor (pg_stat_statements with
//! `track = all`, auditing extensions) no longer see a nested INSERT for a plain enqueue.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr};

use pgrx::pg_sys;

/// Columns of `sluice.task_run` this writes, by name, and what it writes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Id,
    TaskName,
    Status,
    Priority,
    Input,
    RunAt,
    ScheduleDeadline,
    Attempt,
    Failures,
    LostAttempts,
    EnqueuedAt,
}

/// Every column the extension declares: the ones written here with their types, and the ones
/// left NULL (`None`). A column not in this list makes the table ineligible.
const KNOWN_COLUMNS: [(&str, Option<(Column, pg_sys::Oid)>); 27] = [
    ("id", Some((Column::Id, pg_sys::INT8OID))),
    ("task_name", Some((Column::TaskName, pg_sys::TEXTOID))),
    // the enum's type has no fixed oid: checked by name when the shape is built
    ("status", Some((Column::Status, pg_sys::InvalidOid))),
    ("priority", Some((Column::Priority, pg_sys::INT4OID))),
    ("input", Some((Column::Input, pg_sys::JSONBOID))),
    ("run_at", Some((Column::RunAt, pg_sys::TIMESTAMPTZOID))),
    (
        "schedule_deadline",
        Some((Column::ScheduleDeadline, pg_sys::TIMESTAMPTZOID)),
    ),
    ("attempt", Some((Column::Attempt, pg_sys::INT4OID))),
    ("failures", Some((Column::Failures, pg_sys::INT4OID))),
    (
        "lost_attempts",
        Some((Column::LostAttempts, pg_sys::INT4OID)),
    ),
    ("idempotency_key", None),
    ("worker_id", None),
    ("assigned_at", None),
    ("picked_at", None),
    ("timeout_at", None),
    ("output", None),
    ("last_error", None),
    (
        "enqueued_at",
        Some((Column::EnqueuedAt, pg_sys::TIMESTAMPTZOID)),
    ),
    ("finished_at", None),
    ("concurrency_key", None),
    ("rate_limit_keys", None),
    ("rate_limit_units", None),
    ("run_id", None),
    ("step", None),
    ("parent_id", None),
    ("child_key", None),
    ("rate_limited_at", None),
];

/// The one check constraint the rows written here satisfy by construction.
const CHECK_CONSTRAINT: &CStr = c"task_run_finished_at_check";

/// What the fast path needs to know about an eligible task_run.
#[derive(Debug)]
struct Shape {
    relid: pg_sys::Oid,
    /// The attribute count, dropped columns included: the width of the values array.
    natts: usize,
    /// Zero-based attribute index of each column written, in `Column` order.
    columns: Vec<(Column, usize)>,
    /// The identity column's sequence.
    sequence: pg_sys::Oid,
    /// `'queued'::sluice.task_status`: an enum value is its label's oid.
    queued: pg_sys::Datum,
}

thread_local! {
    // None: not looked at since the last invalidation; Some(None): not eligible.
    static SHAPE: RefCell<Option<Option<Shape>>> = const { RefCell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// A relcache invalidation of task_run (or of every relation) drops the shape.
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    SHAPE.with(|shape| {
        let mut shape = shape.borrow_mut();
        let ours = match shape.as_ref() {
            Some(Some(s)) => s.relid == relid,
            // Ineligible or unknown: look again after any change; the next call decides.
            _ => true,
        };
        if relid == pg_sys::InvalidOid || ours {
            *shape = None;
        }
    });
}

/// The five values the plain enqueue writes; everything else is a default or NULL.
pub struct PlainRow {
    pub task_name: pg_sys::Datum,
    pub priority: pg_sys::Datum,
    pub input: pg_sys::Datum,
    pub run_at: pg_sys::TimestampTz,
    pub schedule_deadline: pg_sys::TimestampTz,
}

/// task_run's oid if its shape (as last looked at) takes the direct path.
fn eligible_relid() -> Option<pg_sys::Oid> {
    // Before the shape is built: an invalidation between the two must not be missed.
    if !CALLBACK_REGISTERED.with(Cell::get) {
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0));
        }
        CALLBACK_REGISTERED.with(|c| c.set(true));
    }
    let known = SHAPE.with(|s| s.borrow().as_ref().map(|s| s.as_ref().map(|s| s.relid)));
    known.unwrap_or_else(|| {
        let built = build_shape();
        let relid = built.as_ref().map(|s| s.relid);
        SHAPE.with(|s| *s.borrow_mut() = Some(built));
        relid
    })
}

/// Inserts `row` into sluice.task_run and returns its id, or `None` (having done nothing) when
/// the table or the caller's privileges need the executor's path.
pub fn insert(row: &PlainRow) -> Option<i64> {
    // A read-only transaction (or a standby) gets the executor's error for an INSERT.
    if unsafe { pg_sys::XactReadOnly } {
        return None;
    }
    let relid = eligible_relid()?;
    unsafe {
        // The lock processes pending invalidations: the shape read above may be gone after it.
        let rel = pg_sys::try_table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return None;
        }
        let still_valid = SHAPE
            .with(|s| matches!(s.borrow().as_ref(), Some(Some(shape)) if shape.relid == relid));
        // INSERT, and SELECT for the id the SPI path's RETURNING reads: a caller without both
        // gets that path's error.
        let needed = (pg_sys::ACL_INSERT | pg_sys::ACL_SELECT) as pg_sys::AclMode;
        if !still_valid
            || pg_sys::pg_class_aclmask(
                relid,
                pg_sys::GetUserId(),
                needed,
                pg_sys::AclMaskHow::ACLMASK_ALL,
            ) != needed
        {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return None;
        }
        let id = SHAPE.with(|s| {
            let shape = s.borrow();
            let shape = shape
                .as_ref()
                .and_then(Option::as_ref)
                .expect("checked above");
            write_row(rel, shape, row)
        });
        // The lock is kept to the end of the transaction, as the executor keeps it.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        Some(id)
    }
}

// Called as it is, not through pgrx's guarded bindings, which leave it out
// (commands/sequence.h): inside `pg_guard_ffi_boundary`.
unsafe extern "C-unwind" {
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

unsafe fn write_row(rel: pg_sys::Relation, shape: &Shape, row: &PlainRow) -> i64 {
    unsafe {
        let desc = (*rel).rd_att;
        // Everything below is allocated in the executor state's memory, freed with it.
        let estate = pg_sys::CreateExecutorState();
        let caller_context = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let mut values = vec![pg_sys::Datum::from(0); shape.natts];
        let mut nulls = vec![true; shape.natts];
        // Identity values are taken as the executor takes them: no privilege check.
        let id = pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(shape.sequence, false));
        for &(column, index) in &shape.columns {
            values[index] = match column {
                Column::Id => pg_sys::Datum::from(id),
                Column::TaskName => row.task_name,
                Column::Status => shape.queued,
                Column::Priority => row.priority,
                Column::Input => row.input,
                Column::RunAt => pg_sys::Datum::from(row.run_at),
                Column::ScheduleDeadline => pg_sys::Datum::from(row.schedule_deadline),
                Column::Attempt | Column::Failures | Column::LostAttempts => {
                    pg_sys::Datum::from(0i32)
                }
                // now(), the column's default
                Column::EnqueuedAt => {
                    pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp())
                }
            };
            nulls[index] = false;
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::heap_insert(
            rel,
            tuple,
            pg_sys::GetCurrentCommandId(true),
            0,
            std::ptr::null_mut(),
        );

        // The index entries as the executor makes them: the primary key's uniqueness checked,
        // an entry in each index whose predicate the row meets.
        let result_rel = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        pg_sys::InitResultRelInfo(result_rel, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(result_rel, false);
        let slot = pg_sys::MakeSingleTupleTableSlot(desc, &raw const pg_sys::TTSOpsHeapTuple);
        pg_sys::ExecStoreHeapTuple(tuple, slot, false);
        pg_sys::ExecInsertIndexTuples(
            result_rel,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(result_rel);
        pg_sys::MemoryContextSwitchTo(caller_context);
        pg_sys::FreeExecutorState(estate);
        id
    }
}

/// Looks task_run over; `None` when a plain enqueue must take the executor's path.
fn build_shape() -> Option<Shape> {
    unsafe {
        let relid = crate::catalog::sluice_relation(c"task_run")?;
        let rel = pg_sys::try_table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return None;
        }
        let shape = examine(rel);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        shape
    }
}

unsafe fn examine(rel: pg_sys::Relation) -> Option<Shape> {
    unsafe {
        let class = &*(*rel).rd_rel;
        if class.relkind != pg_sys::RELKIND_RELATION as c_char
            || class.relrowsecurity
            || (*rel).rd_tableam != pg_sys::GetHeapamTableAmRoutine()
        {
            return None;
        }
        if let Some(triggers) = (*rel).trigdesc.as_ref() {
            if triggers.trig_insert_before_row
                || triggers.trig_insert_after_row
                || triggers.trig_insert_instead_row
                || triggers.trig_insert_before_statement
                || triggers.trig_insert_after_statement
                || triggers.trig_insert_new_table
            {
                return None;
            }
        }
        let desc = (*rel).rd_att;
        if let Some(constr) = (*desc).constr.as_ref() {
            if constr.has_generated_stored {
                return None;
            }
            let checks = if constr.num_check == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(constr.check, constr.num_check as usize)
            };
            if checks
                .iter()
                .any(|c| CStr::from_ptr(c.ccname) != CHECK_CONSTRAINT)
            {
                return None;
            }
        }
        let natts = (*desc).natts as usize;
        let attributes = (*desc).attrs.as_slice(natts);
        let mut columns = Vec::new();
        let mut seen = 0;
        let mut id_attnum = None;
        let mut status_type = pg_sys::InvalidOid;
        for (index, attribute) in attributes.iter().enumerate() {
            if attribute.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attribute.attname.data.as_ptr());
            let known = KNOWN_COLUMNS
                .iter()
                .find(|(known, _)| known.as_bytes() == name.to_bytes())?;
            seen += 1;
            if attribute.attgenerated != 0 {
                return None;
            }
            match known.1 {
                None => {
                    // Left NULL: it must take NULL, and have no default that says otherwise.
                    if attribute.attnotnull || attribute.atthasdef || attribute.attidentity != 0 {
                        return None;
                    }
                }
                Some((column, type_oid)) => {
                    let type_matches = if column == Column::Status {
                        // sluice.task_status; 'queued' is looked up in it below
                        pg_sys::get_typtype(attribute.atttypid) == pg_sys::TYPTYPE_ENUM as c_char
                    } else {
                        attribute.atttypid == type_oid
                    };
                    if !type_matches {
                        return None;
                    }
                    if column == Column::Status {
                        status_type = attribute.atttypid;
                    }
                    let identity = attribute.attidentity != 0;
                    if identity != (column == Column::Id) {
                        return None;
                    }
                    if column == Column::Id {
                        id_attnum = Some(attribute.attnum);
                    }
                    columns.push((column, index));
                }
            }
        }
        if seen != KNOWN_COLUMNS.len() {
            return None;
        }
        let sequence = pg_sys::getIdentitySequence((*rel).rd_id, id_attnum?, true);
        if sequence == pg_sys::InvalidOid {
            return None;
        }
        let queued = crate::catalog::queued_status(status_type);
        Some(Shape {
            relid: (*rel).rd_id,
            natts,
            columns,
            sequence,
            queued,
        })
    }
}

/// Whether a plain enqueue in this session now writes its row here (for the tests).
#[cfg(any(test, feature = "pg_test"))]
pub fn eligible() -> bool {
    eligible_relid().is_some()
}
