//! UTF-8 text that stays in the input buffer.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// UTF-8 text held in a [`Bytes`] (usually a slice of the message it was
/// decoded from, so no copy is made).
///
/// The bytes are checked to be UTF-8 when the value is made; [`ByteStr::as_str`]
/// is then a cheap view. Compare with `&str` directly:
///
/// ```
/// use walcast_pgoutput::ByteStr;
///
/// let name = ByteStr::from_static("outbox");
/// assert_eq!(name, "outbox");
/// assert_eq!(name.len(), 6);
/// assert!(ByteStr::from_utf8(bytes::Bytes::from_static(b"\xff")).is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteStr(Bytes);

impl ByteStr {
    /// Checks that `bytes` is UTF-8 and wraps it without copying.
    ///
    /// # Errors
    ///
    /// The [`std::str::Utf8Error`] if `bytes` is not UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(ByteStr(bytes))
    }

    /// Wraps a static string without copying.
    pub const fn from_static(s: &'static str) -> Self {
        ByteStr(Bytes::from_static(s.as_bytes()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Checked when made; an error here is impossible, but fall back to ""
        // rather than panic.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The UTF-8 bytes, sharing the buffer.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The UTF-8 bytes, sharing the buffer (no copy).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for ByteStr {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ByteStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for ByteStr {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Borrow<str> for ByteStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for ByteStr {
    /// Copies the text into a new buffer.
    fn from(s: &str) -> Self {
        ByteStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for ByteStr {
    fn from(s: String) -> Self {
        ByteStr(Bytes::from(s))
    }
}

impl From<ByteStr> for Bytes {
    fn from(s: ByteStr) -> Self {
        s.0
    }
}

impl PartialEq<str> for ByteStr {
    fn eq(&self, other: &str) -> bool {
        self.0.as_ref() == other.as_bytes()
    }
}

impl PartialEq<&str> for ByteStr {
    fn eq(&self, other: &&str) -> bool {
        self.0.as_ref() == other.as_bytes()
    }
}

impl PartialEq<ByteStr> for str {
    fn eq(&self, other: &ByteStr) -> bool {
        other == self
    }
}

impl PartialEq<ByteStr> for &str {
    fn eq(&self, other: &ByteStr) -> bool {
        other == *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_and_shares() {
        let buf = Bytes::from_static(b"public\0outbox\0");
        let s = ByteStr::from_utf8(buf.slice(7..13)).unwrap();
        assert_eq!(s, "outbox");
        assert_eq!("outbox", s);
        assert_eq!(s.as_str(), "outbox");
        assert_eq!(format!("{s} {s:?}"), "outbox \"outbox\"");
        assert_eq!(s.as_bytes().as_ptr(), buf[7..].as_ptr());
        assert!(ByteStr::from_utf8(Bytes::from_static(b"a\xc3")).is_err());
        assert_eq!(ByteStr::from(String::from("ü")).len(), 2);
        assert!(ByteStr::default().is_empty());
    }
}
