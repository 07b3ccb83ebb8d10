//! The duration grammar (`"250ms"`, `"30s"`, `"1h30m"`), free of dependencies so that the
//! `#[dray::job]` macro crate compiles this same file (`#[path]`) and rejects at compile time
//! exactly what [`crate::parse_duration`] rejects at run time.

use std::time::Duration;

/// Parses one or more `<integer><unit>` groups (units `ms s m h d`); the error says why not.
pub fn parse(input: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("{input:?} {why}; write it like 250ms, 30s, 5m, 1h30m or 2d");
    let s = input.trim();
    if s.is_empty() {
        return Err(bad("is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("needs a number before each unit"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("has a number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = |mul: u64| {
            n.checked_mul(mul)
                .map(Duration::from_secs)
                .ok_or_else(|| bad("is too large"))
        };
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86_400)?,
            "" => return Err(bad("needs a unit after each number")),
            _ => return Err(bad("has an unknown unit")),
        };
        total = total.checked_add(part).ok_or_else(|| bad("is too large"))?;
    }
    Ok(total)
}
