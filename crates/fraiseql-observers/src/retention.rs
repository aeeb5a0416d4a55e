//! Keeping the change log small: deleting rows every consumer has processed.
//!
//! Invariant: a row is deleted only when it is older than the retention period AND its writing
//! transaction is visible in every consumer's stored checkpoint (so every consumer has handled
//! it; rows of a batch in progress are not visible in the checkpoint's snapshot and are kept).
//! With no consumer at all nothing is known to be processed, and pruning refuses. Pending retries
//! and dead letters hold their own copy of the event, so pruning never breaks them. A distributed
//! worker's partition rows (`partition_of` set) hold a fencing epoch, not a position: ignored.

use crate::error::{Error, Result};
use std::time::Duration;
use tokio_postgres::Client;

/// Delete processed rows older than `older_than`, `batch_size` rows per statement (short
/// transactions, no long locks). Returns how many rows were deleted.
pub async fn prune(client: &Client, older_than: Duration, batch_size: i64) -> Result<u64> {
    if batch_size < 1 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    let consumers: i64 = client
        .query_one(
            "SELECT count(*) FROM core.observer_checkpoints WHERE partition_of IS NULL",
            &[],
        )
        .await?
        .get(0);
    if consumers == 0 {
        return Err(Error::Invalid(
            "no consumer has a checkpoint yet, so no row is known to be processed: nothing pruned"
                .into(),
        ));
    }
    let statement = client
        .prepare(
            "WITH doomed AS (
                 SELECT l.ctid FROM core.tb_entity_change_log l
                  WHERE l.created_at < now() - make_interval(secs => $1)
                    AND NOT EXISTS (
                        SELECT 1 FROM core.observer_checkpoints c
                         WHERE c.partition_of IS NULL
                           AND NOT pg_visible_in_snapshot(l.txid, c.snapshot))
                  LIMIT $2)
             DELETE FROM core.tb_entity_change_log l USING doomed WHERE l.ctid = doomed.ctid",
        )
        .await?;
    let mut total = 0;
    loop {
        let deleted = client
            .execute(&statement, &[&older_than.as_secs_f64(), &batch_size])
            .await?;
        total += deleted;
        if deleted < batch_size as u64 {
            break;
        }
    }
    if total > 0 {
        tracing::info!(deleted = total, "pruned processed change-log rows");
    }
    Ok(total)
}

/// Parse a retention like `7d`, `12h`, `30m`, `90s`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let bad = || {
        Error::Invalid(format!(
            "'{text}' is not a duration like 7d, 12h, 30m or 90s"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1_800));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        for bad in ["", "7", "d", "7w", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
