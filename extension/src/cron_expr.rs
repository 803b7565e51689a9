//! Cron expressions as users write them, evaluated with the `cron` crate.
//!
//! Users write Unix cron: five fields (minute hour day-of-month month day-of-week, Sunday = 0
//! or 7), or six with seconds first. The crate wants six or seven fields with seconds first and
//! numbers its days of the week 1-7 from Sunday, so a literal `1` would silently mean Sunday
//! instead of Monday. [`normalize`] rewrites the expression into the crate's form and rewrites
//! numeric days of the week; names (`MON-FRI`) and `@daily`-style shorthands pass through.
//!
//! Times here are wall-clock times without a zone: the SQL layer converts them to and from the
//! schedule's time zone with Postgres' own zone database (`AT TIME ZONE`), so a zoned schedule
//! fires once per wall-clock tick across daylight-saving changes.
//!
//! Pure Rust, no Postgres.

use chrono::{NaiveDateTime, TimeZone, Utc};
use cron::Schedule;
use std::str::FromStr;

/// A parsed expression: what `sluice.schedule_cron` validates and the scheduler evaluates.
#[derive(Debug, Clone)]
pub struct CronExpr {
    schedule: Schedule,
}

impl CronExpr {
    pub fn parse(expression: &str) -> Result<CronExpr, String> {
        let normalized = normalize(expression)?;
        let schedule = Schedule::from_str(&normalized).map_err(|e| e.to_string())?;
        Ok(CronExpr { schedule })
    }

    /// The first tick strictly after `after` (wall-clock), if the expression has one.
    pub fn next_after(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        self.schedule
            .after(&Utc.from_utc_datetime(&after))
            .next()
            .map(|t| t.naive_utc())
    }
}

/// Rewrites a Unix-style expression (5 fields, or 6 with seconds first) into the `cron` crate's
/// 6-field form. Errors name what is wrong.
pub fn normalize(expression: &str) -> Result<String, String> {
    let trimmed = expression.trim();
    if trimmed.is_empty() {
        return Err("the expression is empty".into());
    }
    if trimmed.starts_with('@') {
        return match trimmed {
            "@yearly" | "@annually" => Ok("0 0 0 1 1 *".into()),
            "@monthly" => Ok("0 0 0 1 * *".into()),
            "@weekly" => Ok("0 0 0 * * SUN".into()),
            "@daily" | "@midnight" => Ok("0 0 0 * * *".into()),
            "@hourly" => Ok("0 0 * * * *".into()),
            other => Err(format!(
                "unknown shorthand {other} (known: @yearly, @annually, @monthly, @weekly, \
                 @daily, @midnight, @hourly)"
            )),
        };
    }
    let fields: Vec<&str> = trimmed.split_whitespace().collect();
    let (seconds, rest) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        n => {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds \
                 first), got {n}"
            ))
        }
    };
    let day_of_week = unix_days_of_week(rest[4])?;
    Ok(format!(
        "{seconds} {} {} {} {} {day_of_week}",
        rest[0], rest[1], rest[2], rest[3]
    ))
}

/// Unix numbers days of the week 0-7 from Sunday (0 and 7 both Sunday); the crate 1-7 from
/// Sunday. Numeric items and ranges are expanded into the crate's numbers (a range may then
/// wrap, e.g. `5-7` is Friday to Sunday, so it becomes a list); anything else is left to the
/// crate's parser.
fn unix_days_of_week(field: &str) -> Result<String, String> {
    let mut out: Vec<String> = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let bounds = match range.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok(), b.parse::<u32>().ok()),
            None => (range.parse::<u32>().ok(), None),
        };
        match (bounds, step) {
            ((Some(day), None), None) if !range.contains('-') => {
                out.push(crate_day(day)?.to_string())
            }
            ((Some(first), last), step) if last.is_some() || step.is_some() => {
                // `n/step` runs to the end of the week
                let last = last.unwrap_or(7);
                let step: u32 = match step {
                    None => 1,
                    Some(s) => s.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                        format!("day-of-week step \"{s}\" is not a positive number")
                    })?,
                };
                if first > last {
                    return Err(format!("day-of-week range {range} runs backwards"));
                }
                let mut day = first;
                while day <= last {
                    out.push(crate_day(day)?.to_string());
                    day += step;
                }
            }
            _ => out.push(item.to_string()),
        }
    }
    out.dedup();
    Ok(out.join(","))
}

fn crate_day(unix: u32) -> Result<u32, String> {
    if unix > 7 {
        return Err(format!(
            "day of week {unix} is out of range (0-7, Sunday = 0 or 7)"
        ));
    }
    Ok(unix % 7 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, s)
            .unwrap()
    }

    #[test]
    fn five_fields_get_seconds_and_unix_days() {
        assert_eq!(normalize("0 3 * * *").unwrap(), "0 0 3 * * *");
        assert_eq!(normalize("*/5 * * * 1-5").unwrap(), "0 */5 * * * 2,3,4,5,6");
        assert_eq!(normalize("0 0 * * 0").unwrap(), "0 0 0 * * 1");
        assert_eq!(normalize("0 0 * * 7").unwrap(), "0 0 0 * * 1");
        assert_eq!(normalize("0 0 * * 5-7").unwrap(), "0 0 0 * * 6,7,1");
        assert_eq!(normalize("0 0 * * MON-FRI").unwrap(), "0 0 0 * * MON-FRI");
        assert_eq!(normalize("* * * * * *").unwrap(), "* * * * * *");
        assert_eq!(normalize("@daily").unwrap(), "0 0 0 * * *");
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(normalize("").unwrap_err().contains("empty"));
        assert!(normalize("* * *").unwrap_err().contains("got 3"));
        assert!(normalize("0 0 * * 8").unwrap_err().contains("out of range"));
        assert!(normalize("@sometimes")
            .unwrap_err()
            .contains("unknown shorthand"));
        assert!(CronExpr::parse("61 * * * *").is_err());
        assert!(CronExpr::parse("not a cron").is_err());
    }

    #[test]
    fn next_tick_after() {
        let monday = CronExpr::parse("30 9 * * 1").unwrap();
        // 2026-11-23 is a Monday.
        assert_eq!(
            monday.next_after(at(2026, 11, 23, 9, 0, 0)),
            Some(at(2026, 11, 23, 9, 30, 0))
        );
        assert_eq!(
            monday.next_after(at(2026, 11, 23, 9, 30, 0)),
            Some(at(2026, 11, 30, 9, 30, 0))
        );
        let every_second = CronExpr::parse("* * * * * *").unwrap();
        assert_eq!(
            every_second.next_after(at(2026, 1, 1, 0, 0, 0)),
            Some(at(2026, 1, 1, 0, 0, 1))
        );
        let weekdays = CronExpr::parse("0 0 * * 1-5").unwrap();
        // Friday 2026-11-27 -> Monday 2026-11-30
        assert_eq!(
            weekdays.next_after(at(2026, 11, 27, 0, 0, 0)),
            Some(at(2026, 11, 30, 0, 0, 0))
        );
    }
}
