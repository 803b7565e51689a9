//! What a plain enqueue needs from its task's definition, kept per backend.
//!
//! `sluice.enqueue` used to join `task_definition` in its INSERT. Starting that join's scan was a
//! quarter of the call's server time, and with a few hundred definitions the planner chose a
//! sequential scan that read every one of them on each call: with 198 definitions the enqueue
//! statement took 48-70 µs in a loop, and 24-38 µs without the join. The INSERT now takes the
//! priority and schedule timeout from here (see `crate::enqueue`).
//!
//! Entries are valid for one configuration generation (`crate::wake::config_generation`): every
//! change of `task_definition` bumps it when its transaction commits (the API functions call
//! `sluice._config_changed`, a statement trigger for direct edits `sluice._definitions_changed`),
//! after the change became visible and before its client hears of the commit. Reading the
//! generation before the definition (a new snapshot in READ COMMITTED) therefore never caches a
//! value older than its generation. What is not cached:
//!   - in a transaction that changed definitions itself (it may still roll back): until it
//!     ends, every call reads the table, and the cache is emptied when it ends;
//!   - under REPEATABLE READ or SERIALIZABLE (the snapshot may predate the generation read);
//!   - without the preloaded library (there is no generation to check; enqueue then fails
//!     anyway);
//!   - names without a definition.
//!
//! A change committed with two-phase commit bumps no generation (its flags end at PREPARE, and
//! COMMIT PREPARED may run in any session), so the whole cache is also dropped once it is a
//! minute old, as the scheduler rereads definitions with its sweep every minute.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::wake;

/// Entries kept at most; past it the cache starts over (definitions are normally few).
const MAX_ENTRIES: usize = 10_000;
/// The cache starts over at least this often (see the module comment on two-phase commit).
const MAX_AGE: Duration = Duration::from_secs(60);

/// A definition's part in a plain enqueue, or `None` when its tasks need flow control
/// (a concurrency key or rate limits) and take the general path.
#[derive(Debug, Clone, Copy)]
pub struct PlainDefaults {
    pub priority: i32,
    pub schedule_timeout: Interval,
}

struct Cache {
    generation: u64,
    started: Option<Instant>,
    entries: HashMap<String, Option<PlainDefaults>>,
}

thread_local! {
    // A backend is single-threaded; thread_local keeps this out of shared memory.
    static CACHE: RefCell<Cache> = RefCell::new(Cache {
        generation: u64::MAX,
        started: None,
        entries: HashMap::new(),
    });
    static CHANGED_IN_TRANSACTION: Cell<bool> = const { Cell::new(false) };
}

/// The defaults of `task`'s definition: `Some(Some(_))` for a plain one, `Some(None)` for one
/// with flow control, `None` if there is no such definition.
pub fn plain_defaults(task: &str) -> Option<Option<PlainDefaults>> {
    let cacheable = wake::preloaded()
        && !CHANGED_IN_TRANSACTION.with(Cell::get)
        && unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32;
    if !cacheable {
        return read(task);
    }
    let generation = wake::config_generation();
    let cached = CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let expired = cache.started.is_none_or(|at| at.elapsed() >= MAX_AGE);
        if cache.generation != generation || expired || cache.entries.len() >= MAX_ENTRIES {
            cache.entries.clear();
            cache.generation = generation;
            cache.started = Some(Instant::now());
        }
        cache.entries.get(task).copied()
    });
    if let Some(found) = cached {
        return Some(found);
    }
    let found = read(task)?;
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.generation == generation {
            cache.entries.insert(task.to_owned(), found);
        }
    });
    Some(found)
}

/// This transaction changed definitions: read them from the table until it ends.
pub fn changed_in_transaction() {
    CHANGED_IN_TRANSACTION.with(|c| c.set(true));
}

/// The transaction ended (committed, aborted or prepared): if it changed definitions, what
/// was cached may be its own uncommitted or rolled-back view.
pub fn transaction_ended() {
    if CHANGED_IN_TRANSACTION.with(|c| c.replace(false)) {
        CACHE.with(|cache| cache.borrow_mut().entries.clear());
    }
}

fn read(task: &str) -> Option<Option<PlainDefaults>> {
    let row = Spi::get_three_with_args::<i32, Interval, bool>(
        "SELECT d.priority, d.schedule_timeout,
                d.concurrency_key IS NULL AND d.rate_limits = '[]'
           FROM sluice.task_definition d WHERE d.name = $1",
        &[task.into()],
    );
    match row {
        Ok((Some(priority), Some(schedule_timeout), Some(plain))) => {
            Some(plain.then_some(PlainDefaults {
                priority,
                schedule_timeout,
            }))
        }
        _ => None,
    }
}
