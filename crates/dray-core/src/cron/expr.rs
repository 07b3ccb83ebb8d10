//! A schedule's expression in its time zone, and its fire times.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

use super::grammar;

/// A cron expression in a time zone: when a schedule fires.
///
/// Fire times follow the zone's wall clock, daylight saving time included:
/// * a time that does not exist that day (the clocks spring forward over it) fires at the first
///   instant after the gap (02:30 on the spring-forward night in New York fires at 03:00 EDT);
/// * a time that occurs twice (the clocks fall back) fires once, at the first occurrence;
/// * an expression with a wildcard or a step in its hour, minute or second fields (`*/15 * * * *`)
///   is an interval, and follows real time: every quarter hour of the repeated hour runs.
#[derive(Clone, Debug)]
pub struct CronExpr {
    text: String,
    zone_name: String,
    zone: chrono_tz::Tz,
    cron: croner::Cron,
}

impl CronExpr {
    /// Parses `expr` (five fields, or six with a leading seconds field; month and weekday
    /// names, ranges, steps, lists, `L`, `W`, `#`; or `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`) in the IANA zone `zone`. A bad field or zone is
    /// [`Error::InvalidArgument`] naming it and what it accepts.
    pub fn parse(expr: &str, zone: &str) -> Result<CronExpr> {
        let cron =
            grammar::parse_expression(expr).map_err(|e| Error::invalid("cron expression", e))?;
        let tz = grammar::parse_zone(zone).map_err(|e| Error::invalid("timezone", e))?;
        Ok(CronExpr {
            text: expr.trim().to_owned(),
            zone_name: zone.to_owned(),
            zone: tz,
            cron,
        })
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.text
    }

    /// The zone's name.
    pub fn zone(&self) -> &str {
        &self.zone_name
    }

    /// The first fire time strictly after `t`, `None` when there is none (an expression that
    /// matches no date, such as 30 February).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.zone), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last fire time at or before `t`.
    pub fn at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.zone), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// `t` in the schedule's zone, for display (`2026-03-08 03:00:00 EDT`).
    pub fn local(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.zone)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, zone: &str, from: &str) -> String {
        CronExpr::parse(expr, zone)
            .unwrap()
            .next_after(at(from))
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn known_next_fire_times() {
        for (expr, zone, from, want) in [
            // Weekdays at 9 in New York (EST, UTC-5 in January).
            (
                "0 9 * * MON-FRI",
                "America/New_York",
                "2026-01-02T15:00:00Z",
                "2026-01-05T14:00:00+00:00",
            ),
            (
                "0 9 * * MON-FRI",
                "America/New_York",
                "2026-01-05T13:59:59Z",
                "2026-01-05T14:00:00+00:00",
            ),
            // Six fields: every 10 seconds.
            (
                "*/10 * * * * *",
                "UTC",
                "2026-01-01T00:00:05Z",
                "2026-01-01T00:00:10+00:00",
            ),
            (
                "@hourly",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-01T01:00:00+00:00",
            ),
            (
                "@daily",
                "Europe/Berlin",
                "2026-06-01T12:00:00Z",
                "2026-06-01T22:00:00+00:00",
            ),
            (
                "@weekly",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-04T00:00:00+00:00",
            ),
            (
                "@monthly",
                "UTC",
                "2026-01-15T00:00:00Z",
                "2026-02-01T00:00:00+00:00",
            ),
            (
                "@yearly",
                "UTC",
                "2026-01-15T00:00:00Z",
                "2027-01-01T00:00:00+00:00",
            ),
            // L: the last day of the month; #: the second Friday; W: the nearest weekday.
            (
                "0 12 L * *",
                "UTC",
                "2026-02-01T00:00:00Z",
                "2026-02-28T12:00:00+00:00",
            ),
            (
                "0 12 * * FRI#2",
                "UTC",
                "2026-03-01T00:00:00Z",
                "2026-03-13T12:00:00+00:00",
            ),
            (
                "0 12 15W * *",
                "UTC",
                "2026-08-01T00:00:00Z",
                "2026-08-14T12:00:00+00:00",
            ), // 15th is a Saturday
            (
                "30 6 1 JAN,JUL *",
                "Asia/Tokyo",
                "2026-02-01T00:00:00Z",
                "2026-06-30T21:30:00+00:00",
            ),
        ] {
            assert_eq!(
                next(expr, zone, from),
                want,
                "{expr} in {zone} after {from}"
            );
        }
    }

    #[test]
    fn daylight_saving_time_in_two_zones() {
        // New York springs forward on 2026-03-08: 02:00 EST becomes 03:00 EDT. 02:30 does not
        // exist that night: it fires at the first instant after the gap, 03:00 EDT (07:00Z).
        assert_eq!(
            next("30 2 * * *", "America/New_York", "2026-03-08T05:00:00Z"),
            "2026-03-08T07:00:00+00:00"
        );
        // The next day it is 02:30 EDT again (06:30Z).
        assert_eq!(
            next("30 2 * * *", "America/New_York", "2026-03-08T08:00:00Z"),
            "2026-03-09T06:30:00+00:00"
        );
        // It falls back on 2026-11-01: 01:30 happens at 05:30Z (EDT) and 06:30Z (EST). It
        // fires once, at the first.
        let e = CronExpr::parse("30 1 * * *", "America/New_York").unwrap();
        let first = e.next_after(at("2026-11-01T04:00:00Z")).unwrap();
        assert_eq!(first, at("2026-11-01T05:30:00Z"));
        assert_eq!(e.next_after(first).unwrap(), at("2026-11-02T06:30:00Z"));
        // Berlin springs forward on 2026-03-29 (02:00 CET becomes 03:00 CEST) and falls back on
        // 2026-10-25 (03:00 CEST becomes 02:00 CET).
        assert_eq!(
            next("15 2 * * *", "Europe/Berlin", "2026-03-28T23:00:00Z"),
            "2026-03-29T01:00:00+00:00"
        );
        let e = CronExpr::parse("15 2 * * *", "Europe/Berlin").unwrap();
        let first = e.next_after(at("2026-10-24T23:00:00Z")).unwrap();
        assert_eq!(first, at("2026-10-25T00:15:00Z"));
        assert_eq!(e.next_after(first).unwrap(), at("2026-10-26T01:15:00Z"));
        // An interval follows real time through the repeated hour: 01:00, 01:30 EDT, then 01:00,
        // 01:30 EST.
        let e = CronExpr::parse("*/30 1 * * *", "America/New_York").unwrap();
        let mut t = at("2026-11-01T04:59:00Z");
        let mut seen = Vec::new();
        for _ in 0..4 {
            t = e.next_after(t).unwrap();
            seen.push(t.to_rfc3339());
        }
        assert_eq!(
            seen,
            [
                "2026-11-01T05:00:00+00:00",
                "2026-11-01T05:30:00+00:00",
                "2026-11-01T06:00:00+00:00",
                "2026-11-01T06:30:00+00:00"
            ]
        );
    }

    /// For many reference times and expressions: the next fire time is after the reference,
    /// matches the expression, and no fire time lies between them.
    #[test]
    fn next_fire_is_after_and_matches() {
        let exprs = [
            ("*/7 * * * *", "UTC"),
            ("0 9 * * MON-FRI", "America/New_York"),
            ("15 2 * * *", "Europe/Berlin"),
            ("0 0 L * *", "Australia/Sydney"),
            ("*/20 * * * * *", "Asia/Kolkata"),
            ("0 12 * * 5#L", "America/Sao_Paulo"),
        ];
        // A fixed-seed generator: the same cases on every run.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let start = Utc
            .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp();
        for _ in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = DateTime::<Utc>::from_timestamp(start + (x % (3 * 365 * 86_400)) as i64, 0)
                .unwrap();
            for (expr, zone) in exprs {
                let e = CronExpr::parse(expr, zone).unwrap();
                let n = e.next_after(t).unwrap();
                assert!(n > t, "{expr} {zone}: {n} not after {t}");
                let local = n.with_timezone(&e.zone);
                // It matches, or it is the first instant after a spring-forward gap that
                // swallowed a matching wall-clock time.
                let after_gap = {
                    use chrono::Offset;
                    let before = (n - chrono::TimeDelta::seconds(1)).with_timezone(&e.zone);
                    before.offset().fix() != local.offset().fix()
                };
                assert!(
                    e.cron.is_time_matching(&local).unwrap() || after_gap,
                    "{expr} {zone}: {local} does not match"
                );
                // Nothing matches in between (checked second by second up to a minute before).
                let step = if expr.split_whitespace().count() == 6 {
                    1
                } else {
                    60
                };
                let mut c = t + chrono::TimeDelta::seconds(step - t.timestamp() % step);
                let mut checks = 0;
                while c < n && checks < 200 {
                    if c > t {
                        assert!(
                            !e.cron.is_time_matching(&c.with_timezone(&e.zone)).unwrap(),
                            "{expr} {zone}: {c} matches before {n}"
                        );
                    }
                    c += chrono::TimeDelta::seconds(step);
                    checks += 1;
                }
            }
        }
    }

    #[test]
    fn bad_fields_and_zones_are_named() {
        let bad = |e: &str| match CronExpr::parse(e, "UTC") {
            Err(Error::InvalidArgument { what, reason }) => format!("{what}: {reason}"),
            other => panic!("{e}: {other:?}"),
        };
        assert!(bad("0 9 * *").contains("4 fields"), "{}", bad("0 9 * *"));
        assert!(bad("61 * * * *").contains("the minute field \"61\""));
        assert!(bad("0 25 * * *").contains("the hour field \"25\""));
        assert!(bad("0 0 32 * *").contains("the day of month field \"32\""));
        assert!(bad("0 0 * FOO *").contains("the month field \"FOO\""));
        assert!(bad("0 0 * * MONDAY").contains("the day of week field"));
        assert!(bad("99 0 0 * * *").contains("the second field \"99\""));
        assert!(bad("@fortnightly").contains("not an alias"));
        match CronExpr::parse("* * * * *", "Mars/Olympus_Mons") {
            Err(Error::InvalidArgument { what, reason }) => {
                assert_eq!(what, "timezone");
                assert!(reason.contains("IANA"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
