//! PostgreSQL timestamps.

use std::fmt;
use std::time::{Duration, SystemTime};

/// Microseconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch
/// (2000-01-01).
pub const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// A PostgreSQL timestamp as it travels on the wire: microseconds since
/// 2000-01-01 00:00:00 (UTC for `timestamptz` and the protocol's commit
/// times; the wall-clock reading for `timestamp`).
///
/// `i64::MAX` and `i64::MIN` are `infinity` and `-infinity`.
///
/// # Examples
///
/// ```
/// use walcast_pgoutput::PgTimestamp;
///
/// let t = PgTimestamp::from_pg_micros(0);
/// assert_eq!(t.to_unix_micros(), Some(946_684_800_000_000));
/// assert_eq!(t.to_string(), "2000-01-01 00:00:00+00");
/// assert_eq!(PgTimestamp::INFINITY.to_unix_micros(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(i64);

impl PgTimestamp {
    /// `infinity`.
    pub const INFINITY: PgTimestamp = PgTimestamp(i64::MAX);
    /// `-infinity`.
    pub const NEG_INFINITY: PgTimestamp = PgTimestamp(i64::MIN);
    /// 2000-01-01 00:00:00, the PostgreSQL epoch.
    pub const POSTGRES_EPOCH: PgTimestamp = PgTimestamp(0);

    /// From microseconds since 2000-01-01, as on the wire.
    pub const fn from_pg_micros(micros: i64) -> Self {
        PgTimestamp(micros)
    }

    /// Microseconds since 2000-01-01, as on the wire.
    pub const fn pg_micros(self) -> i64 {
        self.0
    }

    /// From microseconds since the Unix epoch; `None` if out of range.
    pub const fn from_unix_micros(micros: i64) -> Option<Self> {
        match micros.checked_sub(POSTGRES_EPOCH_UNIX_MICROS) {
            Some(v) if v != i64::MAX && v != i64::MIN => Some(PgTimestamp(v)),
            _ => None,
        }
    }

    /// Microseconds since the Unix epoch (1970-01-01 00:00:00 UTC); `None`
    /// for ±infinity and for values beyond `i64` after the shift.
    pub const fn to_unix_micros(self) -> Option<i64> {
        if self.is_infinite() {
            return None;
        }
        self.0.checked_add(POSTGRES_EPOCH_UNIX_MICROS)
    }

    /// As a [`SystemTime`]; `None` for ±infinity or out of range.
    pub fn to_system_time(self) -> Option<SystemTime> {
        let micros = self.to_unix_micros()?;
        let d = Duration::from_micros(micros.unsigned_abs());
        if micros >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(d)
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(d)
        }
    }

    /// Whether this is `infinity` or `-infinity`.
    pub const fn is_infinite(self) -> bool {
        self.0 == i64::MAX || self.0 == i64::MIN
    }

    /// Parses PostgreSQL's text output in the `ISO` DateStyle:
    /// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]`, `infinity` or
    /// `-infinity`. With `with_zone` (`timestamptz`) the offset is required
    /// and the result is UTC; without it (`timestamp`) an offset is refused
    /// and the wall-clock reading is kept.
    ///
    /// Returns `None` for anything else (other DateStyles included).
    pub fn parse_iso(text: &str, with_zone: bool) -> Option<Self> {
        match text {
            "infinity" => return Some(Self::INFINITY),
            "-infinity" => return Some(Self::NEG_INFINITY),
            _ => {}
        }
        let (text, bc) = match text.strip_suffix(" BC") {
            Some(t) => (t, true),
            None => (text, false),
        };
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let year = p.number(4, 9)?;
        p.expect(b'-')?;
        let month = p.number(2, 2)?;
        p.expect(b'-')?;
        let day = p.number(2, 2)?;
        p.expect(b' ')?;
        let hour = p.number(2, 2)?;
        p.expect(b':')?;
        let minute = p.number(2, 2)?;
        p.expect(b':')?;
        let second = p.number(2, 2)?;
        let mut micros = 0i64;
        if p.peek() == Some(b'.') {
            p.i += 1;
            let start = p.i;
            let frac = p.number(1, 6)?;
            let digits = (p.i - start) as u32;
            micros = frac * 10i64.pow(6 - digits);
        }
        let mut offset_seconds = 0i64;
        match p.peek() {
            Some(sign @ (b'+' | b'-')) if with_zone => {
                p.i += 1;
                let mut off = p.number(2, 2)? * 3600;
                if p.peek() == Some(b':') {
                    p.i += 1;
                    off += p.number(2, 2)? * 60;
                    if p.peek() == Some(b':') {
                        p.i += 1;
                        off += p.number(2, 2)?;
                    }
                }
                offset_seconds = if sign == b'-' { -off } else { off };
            }
            None if !with_zone => {}
            _ => return None,
        }
        if p.i != p.s.len() {
            return None;
        }
        if year == 0
            || !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month, bc)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        // Astronomical year numbering: 1 BC is year 0.
        let year = if bc { 1 - year } else { year };
        let days = days_from_civil(year, month as u32, day as u32) - days_from_civil(2000, 1, 1);
        let total = i128::from(days) * i128::from(MICROS_PER_DAY)
            + i128::from(hour * 3600 + minute * 60 + second - offset_seconds)
                * i128::from(MICROS_PER_SECOND)
            + i128::from(micros);
        let v = i64::try_from(total).ok()?;
        if v == i64::MAX || v == i64::MIN {
            return None;
        }
        Some(PgTimestamp(v))
    }
}

/// ISO form in UTC, like PostgreSQL's output with `TimeZone = UTC`:
/// `2024-05-06 07:08:09.123456+00` (no fraction when it is zero; ` BC` for
/// years before 1), `infinity`, `-infinity`.
impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::INFINITY => return f.write_str("infinity"),
            Self::NEG_INFINITY => return f.write_str("-infinity"),
            _ => {}
        }
        let days = self.0.div_euclid(MICROS_PER_DAY);
        let in_day = self.0.rem_euclid(MICROS_PER_DAY);
        let (year, month, day) = civil_from_days(days + days_from_civil(2000, 1, 1));
        let secs = in_day / MICROS_PER_SECOND;
        let frac = in_day % MICROS_PER_SECOND;
        let (year, bc) = if year <= 0 {
            (1 - year, true)
        } else {
            (year, false)
        };
        write!(
            f,
            "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )?;
        if frac != 0 {
            let mut digits = format!("{frac:06}");
            while digits.ends_with('0') {
                digits.pop();
            }
            write!(f, ".{digits}")?;
        }
        f.write_str("+00")?;
        if bc {
            f.write_str(" BC")?;
        }
        Ok(())
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }

    /// `min..=max` decimal digits.
    fn number(&mut self, min: usize, max: usize) -> Option<i64> {
        let start = self.i;
        let mut v = 0i64;
        while self.i < self.s.len() && self.i - start < max && self.s[self.i].is_ascii_digit() {
            v = v * 10 + i64::from(self.s[self.i] - b'0');
            self.i += 1;
        }
        (self.i - start >= min).then_some(v)
    }
}

fn days_in_month(year: i64, month: i64, bc: bool) -> i64 {
    let astro = if bc { 1 - year } else { year };
    let leap =
        astro.rem_euclid(4) == 0 && (astro.rem_euclid(100) != 0 || astro.rem_euclid(400) == 0);
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if leap => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz(s: &str) -> Option<i64> {
        PgTimestamp::parse_iso(s, true).map(|t| t.pg_micros())
    }

    #[test]
    fn parses_iso_with_zone() {
        assert_eq!(tz("2000-01-01 00:00:00+00"), Some(0));
        assert_eq!(tz("2000-01-01 05:30:00+05:30"), Some(0));
        assert_eq!(tz("1999-12-31 16:00:00-08"), Some(0));
        assert_eq!(tz("2000-01-01 00:00:00.5+00"), Some(500_000));
        assert_eq!(tz("2000-01-01 00:00:00.000001+00"), Some(1));
        assert_eq!(tz("2000-01-01 00:00:00.123456+00"), Some(123_456));
        // LMT offsets have seconds.
        assert_eq!(tz("2000-01-01 05:53:28+05:53:28"), Some(0));
        assert_eq!(
            PgTimestamp::parse_iso("2024-05-06 07:08:09.123456+00", true)
                .unwrap()
                .to_unix_micros(),
            Some(1_714_979_289_123_456)
        );
        assert_eq!(tz("infinity"), Some(i64::MAX));
        assert_eq!(tz("-infinity"), Some(i64::MIN));
    }

    #[test]
    fn parses_iso_without_zone() {
        let p = |s| PgTimestamp::parse_iso(s, false).map(|t| t.pg_micros());
        assert_eq!(p("2000-01-02 00:00:00"), Some(MICROS_PER_DAY));
        assert_eq!(p("2000-01-02 00:00:00+00"), None);
        assert_eq!(p("1970-01-01 00:00:00"), Some(-POSTGRES_EPOCH_UNIX_MICROS));
        // 0044-03-15 BC is astronomical year -43.
        let bc = p("0044-03-15 12:00:00 BC").unwrap();
        assert_eq!(PgTimestamp(bc).to_string(), "0044-03-15 12:00:00+00 BC");
        let far = p("12345-06-07 08:09:10").unwrap();
        assert_eq!(PgTimestamp(far).to_string(), "12345-06-07 08:09:10+00");
    }

    #[test]
    fn rejects_other_forms() {
        for bad in [
            "",
            "2000-01-01",
            "2000-01-01T00:00:00+00",
            "Sat Jan 01 00:00:00 2000 PST",
            "01/01/2000 00:00:00 PST",
            "2000-13-01 00:00:00+00",
            "2001-02-29 00:00:00+00",
            "2000-01-01 24:00:00+00",
            "2000-01-01 00:00:00.1234567+00",
            "2000-01-01 00:00:00+0",
            "2000-01-01 00:00:00+00 ",
            "0000-01-01 00:00:00+00",
            "999999999-01-01 00:00:00+00",
        ] {
            assert_eq!(PgTimestamp::parse_iso(bad, true), None, "{bad}");
        }
        assert_eq!(
            PgTimestamp::parse_iso("2000-02-29 00:00:00+00", true),
            Some(PgTimestamp(59 * MICROS_PER_DAY))
        );
    }

    #[test]
    fn display_round_trips_through_parse() {
        for v in [
            0i64,
            1,
            -1,
            123_456_789_012,
            -63_000_000_000_000_000,
            200_000_000_000_000_000,
            POSTGRES_EPOCH_UNIX_MICROS,
        ] {
            let t = PgTimestamp(v);
            assert_eq!(PgTimestamp::parse_iso(&t.to_string(), true), Some(t), "{t}");
        }
        assert_eq!(PgTimestamp::INFINITY.to_string(), "infinity");
        assert_eq!(PgTimestamp::NEG_INFINITY.to_string(), "-infinity");
    }

    #[test]
    fn unix_conversions() {
        let t = PgTimestamp::from_unix_micros(0).unwrap();
        assert_eq!(t.pg_micros(), -POSTGRES_EPOCH_UNIX_MICROS);
        assert_eq!(t.to_system_time(), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(PgTimestamp(i64::MAX - 1).to_unix_micros(), None);
        assert_eq!(PgTimestamp::from_unix_micros(i64::MIN), None);
        assert!(PgTimestamp::NEG_INFINITY.to_system_time().is_none());
    }

    #[test]
    fn civil_round_trip() {
        for days in (-1_000_000..1_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
