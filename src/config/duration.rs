//! Human-readable durations (`250ms`, `2s`, `1m`, `1h30m`) as they appear in YAML.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration written as a string with a unit suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

/// Parses `10us`, `250ms`, `2s`, `1.5s`, `5m`, `1h`, and compound
/// durations such as `1h30m`, `1m30s` or `1s500ms` (Go's notation).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS: &str = "use us, ms, s, m or h";
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("an empty duration ({UNITS}: 250ms, 2s, 1m30s)"));
    }
    if s.contains(char::is_whitespace) {
        let joined: String = s.split_whitespace().collect();
        return Err(format!(
            "`{s}`: no spaces inside a duration (write `{joined}`)"
        ));
    }
    let mut rest = s;
    let mut secs = 0.0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        if num.is_empty() {
            return Err(if rest.len() == s.len() {
                format!("`{s}` does not start with a number")
            } else {
                format!("`{s}`: `{rest}` has no number before its unit")
            });
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{s}`: `{num}` is not a number"))?;
        let end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(end);
        let scale = match unit {
            "" if rest.len() == s.len() => return Err(format!("`{s}` has no unit ({UNITS})")),
            "" => return Err(format!("`{s}`: `{num}` at the end has no unit ({UNITS})")),
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("`{s}` has unknown unit `{unit}` ({UNITS})")),
        };
        secs += value * scale;
        rest = next;
    }
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}us", d.as_micros())
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, so that the error is raised inside the deserializer and
        // serde_yaml reports the field path down to this key.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 250ms or 2s")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "`{n}` has no unit (use us, ms, s, m or h)"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "`{n}` has no unit (use us, ms, s, m or h)"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "`{n}` has no unit (use us, ms, s, m or h)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        assert!(parse_duration("250").unwrap_err().contains("no unit"));
        assert!(parse_duration("2d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn compound_durations_add_up() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m0.5s"), Ok(Duration::from_millis(120_500)));
        assert!(parse_duration("1h30").unwrap_err().contains("no unit"));
        assert!(parse_duration("1h-3m").is_err());
    }

    #[test]
    fn spaces_are_named() {
        let e = parse_duration("500 ms").unwrap_err();
        assert!(e.contains("no spaces") && e.contains("`500ms`"), "{e}");
        assert!(parse_duration("1m 30s").unwrap_err().contains("no spaces"));
        // Around it is fine, as before.
        assert_eq!(parse_duration(" 2s "), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn displays_round_trip() {
        for s in ["250ms", "2s", "10us"] {
            let d = Dur(parse_duration(s).unwrap());
            assert_eq!(d.to_string(), s);
        }
    }
}
