//! Meilisearch: documents carry their id in `primary_key`; a run of upserts is one
//! `POST /indexes/{index}/documents?primaryKey=...`, a run of deletes one `delete-batch` (or one
//! `DELETE` for a single document). Meilisearch answers `202 Accepted` with a task: taken as
//! success, so ids are checked before sending (what Meilisearch would refuse asynchronously).

use reqwest::Method;
use serde_json::{Map, Value};

use super::{delete_one_by_one, status_outcome, Endpoint};
use crate::actions::ActionError;

/// Meilisearch ids (document ids, index uids): 1-511 bytes of `A-Z a-z 0-9 - _`.
pub(super) fn valid_id(id: &str) -> bool {
    (1..=511).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Why `name` cannot be a Meilisearch index uid, if it cannot.
pub(super) fn index_problem(name: &str) -> Option<String> {
    (!valid_id(name))
        .then(|| format!("'{name}' is not a valid Meilisearch index uid (A-Z a-z 0-9 - _)"))
}

/// A document id Meilisearch would refuse, as a permanent error.
pub(super) fn check_id(id: &str) -> Result<(), ActionError> {
    if valid_id(id) {
        return Ok(());
    }
    Err(ActionError::permanent(format!(
        "'{id}' is not a valid Meilisearch document id (1-511 bytes of A-Z a-z 0-9 - _)"
    )))
}

/// A run of upserts: one request, one outcome shared by every document.
pub(super) async fn upsert(
    endpoint: &Endpoint,
    primary_key: &str,
    documents: &[&Map<String, Value>],
) -> Vec<Result<(), ActionError>> {
    let body = serde_json::to_vec(&documents).expect("JSON values serialize");
    let outcome = endpoint
        .send(
            Method::POST,
            &["indexes", &endpoint.index, "documents"],
            Some(("primaryKey", primary_key)),
            "application/json",
            body,
        )
        .await
        .and_then(|r| status_outcome(&r, false));
    vec![outcome; documents.len()]
}

/// A run of deletes: one `delete-batch` request for several, one `DELETE` for one.
pub(super) async fn delete(endpoint: &Endpoint, ids: &[&str]) -> Vec<Result<(), ActionError>> {
    if ids.len() < 2 {
        return delete_one_by_one(endpoint, "indexes", ids).await;
    }
    let body = serde_json::to_vec(&ids).expect("strings serialize");
    let outcome = endpoint
        .send(
            Method::POST,
            &["indexes", &endpoint.index, "documents", "delete-batch"],
            None,
            "application/json",
            body,
        )
        .await
        .and_then(|r| status_outcome(&r, true));
    vec![outcome; ids.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meilisearch_ids() {
        assert!(valid_id("0190f0a2-0000-7000-8000-0000000000aa"));
        assert!(valid_id("sku_12"));
        assert!(!valid_id("a.b"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(512)));
        assert!(check_id("a.b").is_err());
    }
}
