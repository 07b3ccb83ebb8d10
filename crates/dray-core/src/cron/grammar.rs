//! Cron expressions and time zones, checked with errors that name the field: shared by the
//! engine and, through `#[path]`, by `#[dray::cron]`, which checks literals at compile time.
//! Depends on nothing of Dray's.
//!
//! Parsing and next-fire times are `croner`'s (POSIX/Vixie fields, an optional leading seconds
//! field, month and weekday names, `L`, `W`, `#`, `@hourly`-style aliases, and daylight saving
//! time handled as Dray documents it); zones are `chrono-tz`'s IANA database.

/// The fields of a five-field expression, in order, with what each accepts.
const FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31, L (last day), 15W (nearest weekday)"),
    ("month", "1-12 or JAN-DEC"),
    (
        "day of week",
        "0-7 (0 and 7 are Sunday) or SUN-SAT, 5#2 (second Friday), 5#L (last Friday)",
    ),
];

/// The aliases accepted for a whole expression.
pub const ALIASES: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// Parses `expr` (five fields, or six with a leading seconds field, or an alias), or says which
/// field is wrong and what it accepts.
pub fn parse_expression(expr: &str) -> Result<croner::Cron, String> {
    let expr = expr.trim();
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build();
    if expr.starts_with('@') {
        if !ALIASES.contains(&expr.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{expr:?} is not an alias Dray knows; use one of {}",
                ALIASES.join(", ")
            ));
        }
        return parser.parse(expr).map_err(|e| format!("{expr:?}: {e}"));
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let names: Vec<(&str, &str)> = match fields.len() {
        5 => FIELDS.to_vec(),
        6 => std::iter::once(("second", "0-59"))
            .chain(FIELDS.iter().copied())
            .collect(),
        n => {
            return Err(format!(
                "{expr:?} has {n} fields; write five (minute hour day-of-month month day-of-week) or six with a leading seconds field, e.g. \"0 9 * * MON-FRI\""
            ));
        }
    };
    match parser.parse(expr) {
        Ok(c) => Ok(c),
        Err(whole) => {
            // Find the field at fault: each one alone, the others `*`.
            for (i, (name, accepts)) in names.iter().enumerate() {
                let probe: Vec<&str> = (0..fields.len())
                    .map(|j| if j == i { fields[j] } else { "*" })
                    .collect();
                if let Err(e) = parser.parse(&probe.join(" ")) {
                    return Err(format!(
                        "the {name} field {:?} of {expr:?} is not valid ({e}); it accepts {accepts}, with * , - and /",
                        fields[i]
                    ));
                }
            }
            Err(format!("{expr:?} is not a valid cron expression: {whole}"))
        }
    }
}

/// Parses an IANA time zone name (`America/New_York`, `UTC`).
pub fn parse_zone(zone: &str) -> Result<chrono_tz::Tz, String> {
    zone.parse::<chrono_tz::Tz>().map_err(|_| {
        format!(
            "{zone:?} is not a time zone Dray knows; use an IANA name such as UTC, Europe/Berlin or America/New_York"
        )
    })
}
