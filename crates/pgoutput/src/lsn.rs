//! Write-ahead log positions.

use std::fmt;
use std::str::FromStr;

/// A PostgreSQL write-ahead log position (`pg_lsn`): a byte offset into the
/// WAL, shown as two hexadecimal halves `X/Y`.
///
/// Ordering is the WAL order. The difference of two positions is a byte
/// count, which is how replication lag is measured
/// ([`Lsn::saturating_sub`]).
///
/// # Examples
///
/// ```
/// use walcast_pgoutput::Lsn;
///
/// let flushed: Lsn = "16/B374D848".parse().unwrap();
/// let server: Lsn = "16/B3750000".parse().unwrap();
/// assert_eq!(server.to_string(), "16/B3750000");
/// assert_eq!(server.saturating_sub(flushed), 0x27b8); // lag in bytes
/// assert!(flushed < server);
/// assert_eq!(u64::from(Lsn::from(42)), 42);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(u64);

impl Lsn {
    /// The zero position, `0/0` (PostgreSQL's `InvalidXLogRecPtr`).
    pub const ZERO: Lsn = Lsn(0);
    /// The largest position, `FFFFFFFF/FFFFFFFF`.
    pub const MAX: Lsn = Lsn(u64::MAX);

    /// A position from its 64-bit value.
    pub const fn new(value: u64) -> Self {
        Lsn(value)
    }

    /// The 64-bit value of this position.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether this is `0/0`, which PostgreSQL uses for "no position".
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Bytes of WAL from `earlier` to `self`, or 0 if `earlier` is ahead.
    /// This is the lag measure: `server_lsn.saturating_sub(flushed_lsn)`.
    pub const fn saturating_sub(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Bytes of WAL from `earlier` to `self`, or `None` if `earlier` is ahead.
    pub const fn checked_sub(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// This position moved forward by `bytes`, or `None` past the end.
    pub const fn checked_add(self, bytes: u64) -> Option<Lsn> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(Lsn(v)),
            None => None,
        }
    }

    /// This position moved forward by `bytes`, stopping at [`Lsn::MAX`].
    pub const fn saturating_add(self, bytes: u64) -> Lsn {
        Lsn(self.0.saturating_add(bytes))
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

/// Shows the PostgreSQL form: uppercase hexadecimal halves without padding,
/// e.g. `16/B374D848`, `0/0`.
impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// The text given to [`Lsn::from_str`] is not an `X/Y` position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal numbers of 1 to 8 digits joined by '/', like 16/B374D848")]
pub struct ParseLsnError {
    input: String,
}

/// Parses `X/Y` where each half has 1 to 8 hexadecimal digits, in either
/// case, padded or not (`0/16B3748`, `00000000/016b3748`).
impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.chars().take(64).collect(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| -> Result<u64, ParseLsnError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_postgres_form() {
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn::new(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::new(0x0000_0001_0000_0000).to_string(), "1/0");
        assert_eq!(Lsn::MAX.to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(format!("{:?}", Lsn::new(0x1A)), "Lsn(0/1A)");
    }

    #[test]
    fn parse_accepts_padding_and_case() {
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!(
            "16/B374D848".parse::<Lsn>().unwrap(),
            Lsn::new(0x16_B374_D848)
        );
        assert_eq!(
            "00000016/b374d848".parse::<Lsn>().unwrap(),
            Lsn::new(0x16_B374_D848)
        );
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn::MAX);
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "g/0",
            "0/-1",
            "+1/0",
            "123456789/0",
            " 0/0",
            "0/0 ",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains("invalid LSN"), "{bad:?}");
        }
    }

    #[test]
    fn arithmetic() {
        let a = Lsn::new(100);
        let b = Lsn::new(250);
        assert_eq!(b.saturating_sub(a), 150);
        assert_eq!(a.saturating_sub(b), 0);
        assert_eq!(a.checked_sub(b), None);
        assert_eq!(b.checked_sub(a), Some(150));
        assert_eq!(a.checked_add(150), Some(b));
        assert_eq!(Lsn::MAX.checked_add(1), None);
        assert_eq!(Lsn::MAX.saturating_add(1), Lsn::MAX);
        assert!(a < b && Lsn::ZERO.is_zero());
        assert_eq!(u64::from(Lsn::from(7u64)), 7);
    }

    #[test]
    fn display_parse_round_trip() {
        for v in [
            0u64,
            1,
            0xFFFF_FFFF,
            0x1_0000_0000,
            u64::MAX,
            0xDEAD_BEEF_0000_0001,
        ] {
            let lsn = Lsn::new(v);
            assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
    }
}
