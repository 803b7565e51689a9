//! `sluice._array_position(ids bigint[], id bigint)`: `array_position()` for the claim's and
//! the completion's batches, without its search from the start of the array for every row.
//!
//! Those statements update a batch of tasks by id and find each row's expected attempt (and
//! output, timeout) by its position in the arrays the worker passed. Built-in
//! `array_position()` compares the id with each element in turn through the type's equality
//! function: quadratic in the batch, ~1 µs per row at 100 and 4-7 µs at 500, twice per row.
//! This one sorts the array once per call site and statement (kept in the expression's
//! `fn_extra`, which lives as long as the statement's executor state) and binary-searches it.
//! Every call checks that the array is the one the sort was made from (a byte comparison of the
//! whole array: tens of nanoseconds for a batch), so a call site whose array changes from row
//! to row still gets the right answer, only without the saving.
//!
//! Declared in sql/api.sql (`LANGUAGE c`), like `sluice.enqueue`: as a `#[pg_extern]` taking
//! `Array<i64>` it would unpack the array into a new vector on every call.

use std::mem::size_of;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The version-1 calling convention marker Postgres looks up for a C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_sluice_array_position() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// What a call site keeps between calls, in one allocation in the function's memory context:
/// this header, then the array's bytes as they were (`raw_len`, padded to 8), then the ids that
/// are not NULL sorted by (id, subscript) (`len` of them), then their subscripts in that order.
#[repr(C)]
struct Sorted {
    raw_len: usize,
    len: usize,
}

const fn pad8(n: usize) -> usize {
    (n + 7) & !7
}

impl Sorted {
    unsafe fn raw(&self) -> &[u8] {
        let start = (self as *const Self).cast::<u8>().add(size_of::<Self>());
        unsafe { std::slice::from_raw_parts(start, self.raw_len) }
    }

    unsafe fn ids(&self) -> &[i64] {
        let start = (self as *const Self)
            .cast::<u8>()
            .add(size_of::<Self>() + pad8(self.raw_len));
        unsafe { std::slice::from_raw_parts(start.cast::<i64>(), self.len) }
    }

    unsafe fn subscripts(&self) -> &[i32] {
        let start = (self as *const Self)
            .cast::<u8>()
            .add(size_of::<Self>() + pad8(self.raw_len) + 8 * self.len);
        unsafe { std::slice::from_raw_parts(start.cast::<i32>(), self.len) }
    }

    /// The subscript of the first element equal to `id`, as `array_position()` returns it.
    unsafe fn position(&self, id: i64) -> Option<i32> {
        let ids = unsafe { self.ids() };
        let at = ids.partition_point(|&x| x < id);
        (at < ids.len() && ids[at] == id).then(|| unsafe { self.subscripts()[at] })
    }

    /// Sorts `array` (bytes `raw`) into a new allocation in `context`.
    unsafe fn build(
        array: *mut pg_sys::ArrayType,
        raw: &[u8],
        context: pg_sys::MemoryContext,
    ) -> *mut Sorted {
        let (mut elements, mut nulls, mut count) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
        unsafe {
            pg_sys::deconstruct_array(
                array,
                pg_sys::INT8OID,
                8,
                true,
                pg_sys::TYPALIGN_DOUBLE as _,
                &mut elements,
                &mut nulls,
                &mut count,
            );
        }
        // An empty array has no dimensions, so no lower bound to read.
        let lower_bound = if count > 0 {
            unsafe { *array_lower_bounds(array) }
        } else {
            1
        };
        let mut pairs: Vec<(i64, i32)> = (0..count as usize)
            .filter(|&i| !unsafe { *nulls.add(i) })
            .map(|i| {
                let id = unsafe { (*elements.add(i)).value() as i64 };
                (id, lower_bound + i as i32)
            })
            .collect();
        pairs.sort_unstable();
        let len = pairs.len();
        let size = size_of::<Sorted>() + pad8(raw.len()) + 8 * len + 4 * len;
        unsafe {
            let sorted = pg_sys::MemoryContextAlloc(context, size).cast::<Sorted>();
            sorted.write(Sorted {
                raw_len: raw.len(),
                len,
            });
            let base = sorted.cast::<u8>().add(size_of::<Sorted>());
            std::ptr::copy_nonoverlapping(raw.as_ptr(), base, raw.len());
            let ids = base.add(pad8(raw.len())).cast::<i64>();
            let subscripts = ids.add(len).cast::<i32>();
            for (i, &(id, subscript)) in pairs.iter().enumerate() {
                ids.add(i).write(id);
                subscripts.add(i).write(subscript);
            }
            sorted
        }
    }
}

/// The array's lower bounds (one per dimension), after its header and its dimensions.
unsafe fn array_lower_bounds(array: *const pg_sys::ArrayType) -> *const i32 {
    unsafe {
        let dims = array
            .cast::<u8>()
            .add(size_of::<pg_sys::ArrayType>())
            .cast::<i32>();
        dims.add((*array).ndim as usize)
    }
}

/// `sluice._array_position(ids bigint[], id bigint) RETURNS int`, strict: the subscript of the
/// first element of `ids` equal to `id`, NULL if none is.
///
/// # Safety
/// Called by Postgres through the version-1 convention with the two arguments above.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn sluice_array_position(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = (*fcinfo).args.as_slice(2);
        let array =
            pg_sys::pg_detoast_datum(args[0].value.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let id = args[1].value.value() as i64;
        if (*array).ndim > 1 {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "searching for elements in multidimensional arrays is not supported"
            );
        }
        let raw_len = pgrx::varlena::varsize_any(array.cast());
        let raw = std::slice::from_raw_parts(array.cast::<u8>(), raw_len);
        let flinfo = (*fcinfo).flinfo;
        let mut sorted = (*flinfo).fn_extra.cast::<Sorted>();
        if sorted.is_null() || (*sorted).raw() != raw {
            if !sorted.is_null() {
                pg_sys::pfree(sorted.cast());
            }
            sorted = Sorted::build(array, raw, (*flinfo).fn_mcxt);
            (*flinfo).fn_extra = sorted.cast();
        }
        match (*sorted).position(id) {
            Some(subscript) => pg_sys::Datum::from(subscript),
            None => {
                (*fcinfo).isnull = true;
                pg_sys::Datum::from(0)
            }
        }
    }
}
