//! `pg_snapshot` values, parsed from and written back to their text form `xmin:xmax:xip,...`.
//! Pure: the reader compares snapshots here and passes them to SQL as text.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A PostgreSQL snapshot: transactions below `xmin` are finished, those at or above `xmax` had not
/// started, and `xip` lists the ones in between that were still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// A snapshot before any transaction: reading from it yields the whole log.
    pub fn beginning() -> Self {
        Snapshot {
            xmin: 1,
            xmax: 1,
            xip: Vec::new(),
        }
    }

    /// Whether the changes of transaction `txid` are visible in this snapshot (when it committed).
    pub fn is_visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.xip.contains(&txid))
    }

    /// Whether this snapshot sees something `other` cannot have seen: true when a stored
    /// checkpoint is ahead of the database's current snapshot.
    pub fn is_ahead_of(&self, other: &Snapshot) -> bool {
        self.xmax > other.xmax
    }

    /// `xip` as text, for `$n::text[]::xid8[]`.
    pub fn xip_text(&self) -> Vec<String> {
        self.xip.iter().map(u64::to_string).collect()
    }
}

impl FromStr for Snapshot {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Snapshot(s.to_string());
        let mut parts = s.trim().splitn(3, ':');
        let xmin: u64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let xmax: u64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let xip_text = parts.next().ok_or_else(bad)?;
        let xip = if xip_text.is_empty() {
            Vec::new()
        } else {
            xip_text
                .split(',')
                .map(|x| x.parse::<u64>().map_err(|_| bad()))
                .collect::<Result<Vec<_>>>()?
        };
        if xmin > xmax || xip.iter().any(|x| *x < xmin || *x >= xmax) {
            return Err(bad());
        }
        Ok(Snapshot { xmin, xmax, xip })
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_form() {
        for text in ["10:20:", "10:20:10,15,19", "1:1:"] {
            let s: Snapshot = text.parse().unwrap();
            assert_eq!(s.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed_text() {
        for text in [
            "", "10", "10:20", "x:20:", "20:10:", "10:20:9", "10:20:20", "10:20:a",
        ] {
            assert!(text.parse::<Snapshot>().is_err(), "{text}");
        }
    }

    #[test]
    fn visibility_follows_postgres_rules() {
        let s: Snapshot = "10:20:12,15".parse().unwrap();
        assert!(s.is_visible(9));
        assert!(s.is_visible(10));
        assert!(!s.is_visible(12));
        assert!(s.is_visible(13));
        assert!(!s.is_visible(20));
        assert!(Snapshot::beginning().is_ahead_of(&"0:0:".parse().unwrap()));
        assert!(!Snapshot::beginning().is_ahead_of(&s));
    }
}
