//! Human durations: `"250ms"`, `"30s"`, `"5m"`, `"1h30m"`, `"2d"`.
//!
//! Used by the CLI, the HTTP API and the `#[dray::job(timeout = "5m")]` attributes, so one
//! grammar serves them all: one or more `<integer><unit>` groups, units `ms s m h d`.

use std::time::Duration;

use crate::error::{Error, Result};

/// The longest span Dray accepts for anything it writes to a database or schedules: a delay,
/// a lease, a retention, a leader's term, an interval (100 years of 365 days). A longer one is
/// refused with [`Error::InvalidArgument`] naming the parameter; where a store is handed one
/// directly, it is cut to this. Waits are the exception: a wait longer than the clock can count
/// ([`deadline`] returns `None`), `Duration::MAX` included, waits forever.
pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Checks parameter `what`: at least `min` and at most [`MAX_SPAN`]; the error names the
/// parameter, the value and both bounds.
pub fn check_span(what: &'static str, d: Duration, min: Duration) -> Result<Duration> {
    if d < min || d > MAX_SPAN {
        return Err(Error::invalid(
            what,
            format!(
                "{} is out of range: it must be at least {} and at most 100 years",
                show(d),
                show(min)
            ),
        ));
    }
    Ok(d)
}

/// The instant `wait` from now, or `None` when that lies beyond what the clock can count: the
/// caller then waits forever (how every public wait reads `Duration::MAX`).
pub fn deadline(wait: Duration) -> Option<tokio::time::Instant> {
    tokio::time::Instant::now().checked_add(wait)
}

/// A duration for an error message: the grammar's form when it is whole milliseconds, else
/// Debug (`1ns`, `18446744073709551615.999999999s`).
fn show(d: Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) && d.as_millis() > 0 && d <= MAX_SPAN {
        format_duration(d)
    } else {
        format!("{d:?}")
    }
}

/// Parses a human duration such as `"30s"` or `"1h30m"`.
pub fn parse_duration(input: &str) -> Result<Duration> {
    crate::duration_grammar::parse(input).map_err(|reason| Error::invalid("duration", reason))
}

/// Formats a duration in the grammar [`parse_duration`] reads (`"1h30m"`, `"250ms"`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grammar() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration(" 5m ").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        for bad in [
            "",
            "5",
            "s",
            "5 parsecs",
            "5x",
            "-1s",
            "99999999999999999999s",
            "1.5s",
        ] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains("write it like"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for d in [1u64, 999, 1000, 61_000, 5_400_000, 90_061_001] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }
}
