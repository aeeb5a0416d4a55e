//! How much the reader holds at once: the size of an id page and of a chunk of rows, and how they
//! shrink when the server cancels a read (`statement_timeout`, SQLSTATE 57014) or fails on a row.
//! Pure: the reader feeds it what happened and asks it how much to read next.
//!
//! Invariants:
//! * An id page holds at most `id_page_size` sequences (fewer after timeouts, never 0).
//! * A chunk holds at most `batch_size` rows and, once the size of rows is known (sampled at start,
//!   then measured on every chunk read), about `max_chunk_bytes`: its row count is
//!   `max_chunk_bytes / (largest row of the last chunk)`, at least 1.
//! * A timeout or a row failure halves the chunk (or page); sizes grow back by doubling only after
//!   a run of successful reads, so a slow stretch is not hit again at once.
//! * A chunk of one row that still fails on the server has found its bad row: the reader
//!   quarantines it (a timeout at one row is retried with backoff instead: it may pass later).

use crate::error::Error;

/// Successful reads after which a shrunken size doubles again.
const GROW_AFTER: u32 = 8;

/// What a failed read says about the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFailure {
    /// The server cancelled the statement (`statement_timeout`, SQLSTATE 57014): read less.
    Timeout,
    /// The server failed while producing a row (a data exception, an error raised by a function
    /// or cast, a corrupt value): narrow the chunk down to the row.
    Row,
}

impl ReadFailure {
    /// Classify a failed read; `None` for everything else (a lost connection, a missing table,
    /// a permission denied, ...), which keeps its usual handling.
    pub fn of(e: &Error) -> Option<ReadFailure> {
        match e {
            Error::Database(e) => ReadFailure::of_db(e),
            _ => None,
        }
    }

    /// [`ReadFailure::of`] for the driver's error.
    pub fn of_db(e: &tokio_postgres::Error) -> Option<ReadFailure> {
        let code = e.code()?.code();
        if code == "57014" {
            return Some(ReadFailure::Timeout);
        }
        // 22 data exception, 2F/38/39 errors in functions, P0 raised by PL/pgSQL, 54 a program
        // limit hit by one value, XX internal (e.g. a corrupt TOAST value).
        matches!(&code[..2], "22" | "2F" | "38" | "39" | "P0" | "54" | "XX")
            .then_some(ReadFailure::Row)
    }
}

/// The sizes of the next id page and chunk.
#[derive(Debug, Clone)]
pub struct Sizing {
    batch_size: usize,
    max_chunk_bytes: usize,
    id_page_size: usize,
    /// The chunk's row cap after failures (at most `batch_size`).
    chunk_limit: usize,
    chunk_streak: u32,
    page_limit: usize,
    page_streak: u32,
    /// Bytes of the largest row of the last chunk read (0: not known yet).
    row_bytes: usize,
}

impl Sizing {
    pub fn new(batch_size: usize, max_chunk_bytes: usize, id_page_size: usize) -> Sizing {
        Sizing {
            batch_size: batch_size.max(1),
            max_chunk_bytes: max_chunk_bytes.max(1),
            id_page_size: id_page_size.max(1),
            chunk_limit: batch_size.max(1),
            chunk_streak: 0,
            page_limit: id_page_size.max(1),
            page_streak: 0,
            row_bytes: 0,
        }
    }

    /// Rows of the next chunk.
    pub fn chunk_rows(&self) -> usize {
        let by_bytes = self
            .max_chunk_bytes
            .checked_div(self.row_bytes)
            .map_or(self.batch_size, |rows| rows.max(1));
        self.chunk_limit.min(by_bytes).min(self.batch_size)
    }

    /// Sequences of the next id page.
    pub fn page_ids(&self) -> usize {
        self.page_limit
    }

    /// An estimate of the size of a row before any chunk was read (sampled from the log).
    pub fn assume_row_bytes(&mut self, bytes: usize) {
        if self.row_bytes == 0 {
            self.row_bytes = bytes;
        }
    }

    /// A chunk of `rows` rows was read; its largest row had `largest_row` bytes.
    pub fn chunk_read(&mut self, rows: usize, largest_row: usize) {
        if rows > 0 {
            self.row_bytes = largest_row.max(1);
        }
        self.chunk_streak += 1;
        if self.chunk_streak >= GROW_AFTER && self.chunk_limit < self.batch_size {
            self.chunk_limit = (self.chunk_limit * 2).min(self.batch_size);
            self.chunk_streak = 0;
        }
    }

    /// A chunk of `rows` rows failed. Returns whether it can be read smaller (false at one row).
    pub fn chunk_failed(&mut self, rows: usize) -> bool {
        self.chunk_streak = 0;
        if rows <= 1 {
            return false;
        }
        self.chunk_limit = rows / 2;
        true
    }

    /// An id page was read.
    pub fn page_read(&mut self) {
        self.page_streak += 1;
        if self.page_streak >= GROW_AFTER && self.page_limit < self.id_page_size {
            self.page_limit = (self.page_limit * 2).min(self.id_page_size);
            self.page_streak = 0;
        }
    }

    /// An id page timed out. Returns whether it can be read smaller.
    pub fn page_failed(&mut self) -> bool {
        self.page_streak = 0;
        if self.page_limit <= 1 {
            return false;
        }
        self.page_limit /= 2;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_bounded_by_rows_and_bytes() {
        let mut s = Sizing::new(1000, 64 * 1024, 100_000);
        assert_eq!(s.chunk_rows(), 1000, "nothing known: rows only");
        s.chunk_read(1000, 100);
        assert_eq!(s.chunk_rows(), 655);
        s.chunk_read(655, 1024 * 1024);
        assert_eq!(
            s.chunk_rows(),
            1,
            "a row above the bound: one row at a time"
        );
        s.chunk_read(1, 10);
        assert_eq!(s.chunk_rows(), 1000);
    }

    #[test]
    fn failures_halve_and_successes_grow_back() {
        let mut s = Sizing::new(1000, usize::MAX, 8);
        assert!(s.chunk_failed(1000));
        assert_eq!(s.chunk_rows(), 500);
        assert!(s.chunk_failed(500));
        assert!(s.chunk_failed(250));
        assert_eq!(s.chunk_rows(), 125);
        for _ in 0..GROW_AFTER {
            s.chunk_read(125, 10);
        }
        assert_eq!(s.chunk_rows(), 250);
        assert!(!s.chunk_failed(1), "one row cannot be split");

        assert!(s.page_failed());
        assert_eq!(s.page_ids(), 4);
        assert!(s.page_failed() && s.page_failed());
        assert!(!s.page_failed());
        assert_eq!(s.page_ids(), 1);
        for _ in 0..3 * GROW_AFTER {
            s.page_read();
        }
        assert_eq!(s.page_ids(), 8);
    }
}
