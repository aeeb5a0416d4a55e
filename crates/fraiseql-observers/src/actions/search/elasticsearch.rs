//! Elasticsearch and OpenSearch: one `_bulk` request per batch (NDJSON `index` and `delete`
//! actions, applied by the engine in order), with a status per item.

use reqwest::Method;
use serde_json::{json, Value};

use super::{status_outcome, Endpoint, Operation, Outcomes};
use crate::actions::ActionError;

/// Why `name` cannot be an Elasticsearch or OpenSearch index name, if it cannot.
pub(super) fn index_problem(name: &str) -> Option<String> {
    (name.chars().any(|c| c.is_ascii_uppercase())
        || name.starts_with(['-', '_', '+'])
        || name.contains(['\\', '*', '"', '<', '>', '|', ',', ':']))
    .then(|| {
        format!(
            "'{name}' is not a valid index name (lowercase, not starting with -, _ or +, \
             none of \\ * \" < > | , :)"
        )
    })
}

/// Send every operation in one `_bulk` request; each event gets its item's outcome.
pub(super) async fn bulk(
    endpoint: &Endpoint,
    operations: &[(usize, Operation)],
    outcomes: &mut Outcomes,
) {
    let index = &endpoint.index;
    let mut body = String::new();
    for (_, op) in operations {
        match op {
            Operation::Upsert { id, document } => {
                body.push_str(&json!({"index": {"_index": index, "_id": id}}).to_string());
                body.push('\n');
                body.push_str(&Value::Object(document.clone()).to_string());
                body.push('\n');
            }
            Operation::Delete { id } => {
                body.push_str(&json!({"delete": {"_index": index, "_id": id}}).to_string());
                body.push('\n');
            }
        }
    }
    let answer = endpoint
        .send(
            Method::POST,
            &["_bulk"],
            None,
            "application/x-ndjson",
            body.into_bytes(),
        )
        .await;
    // The request as a whole first: refused or failed, every event shares that outcome.
    let response = match answer.and_then(|r| status_outcome(&r, false).map(|_| r)) {
        Ok(response) => response,
        Err(e) => {
            for (slot, _) in operations {
                outcomes.set(*slot, Err(e.clone()));
            }
            return;
        }
    };
    let items = serde_json::from_slice::<Value>(&response.body)
        .ok()
        .and_then(|v| v["items"].as_array().cloned())
        .filter(|items| items.len() == operations.len());
    let Some(items) = items else {
        let error = ActionError::transient(format!(
            "the _bulk answer ({}) has no result for each of the {} actions: {}",
            response.status.as_u16(),
            operations.len(),
            response.body_snippet(200)
        ));
        for (slot, _) in operations {
            outcomes.set(*slot, Err(error.clone()));
        }
        return;
    };
    for ((slot, op), item) in operations.iter().zip(&items) {
        outcomes.set(*slot, bulk_item_outcome(op, item));
    }
}

/// One `_bulk` item: `{"index": {"status": 201, ...}}` or `{"delete": {"status": 404,
/// "result": "not_found"}}` or an item with `error`.
fn bulk_item_outcome(op: &Operation, item: &Value) -> Result<(), ActionError> {
    let key = match op {
        Operation::Upsert { .. } => "index",
        Operation::Delete { .. } => "delete",
    };
    let result = &item[key];
    let Some(status) = result["status"].as_u64() else {
        return Err(ActionError::transient(format!(
            "the _bulk answer has no '{key}' status for document {}",
            op.id()
        )));
    };
    if (200..300).contains(&status) || (key == "delete" && status == 404) {
        return Ok(());
    }
    let error = &result["error"];
    let detail = match (error["type"].as_str(), error["reason"].as_str()) {
        (Some(t), Some(r)) => format!("{t}: {}", r.chars().take(200).collect::<String>()),
        (Some(t), None) => t.to_string(),
        _ => error.as_str().unwrap_or_default().to_string(),
    };
    let message = format!(
        "document {}: the engine answered {status} ({detail})",
        op.id()
    );
    if status == 429 || status >= 500 {
        Err(ActionError::transient(message))
    } else {
        Err(ActionError::permanent(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::FailureKind;
    use serde_json::Map;

    #[test]
    fn bulk_items_are_classified() {
        let upsert = Operation::Upsert {
            id: "a".into(),
            document: Map::new(),
        };
        let delete = Operation::Delete { id: "a".into() };
        let item = |key: &str, status: u64| json!({ key: {"status": status, "error": {"type": "t", "reason": "r"}} });
        assert_eq!(bulk_item_outcome(&upsert, &item("index", 201)), Ok(()));
        assert_eq!(bulk_item_outcome(&delete, &item("delete", 404)), Ok(()));
        assert_eq!(
            bulk_item_outcome(&upsert, &item("index", 400))
                .unwrap_err()
                .kind,
            FailureKind::Permanent
        );
        assert!(bulk_item_outcome(&upsert, &item("index", 429))
            .unwrap_err()
            .is_retryable());
        assert!(bulk_item_outcome(&upsert, &item("index", 503))
            .unwrap_err()
            .is_retryable());
        assert!(bulk_item_outcome(&upsert, &json!({}))
            .unwrap_err()
            .is_retryable());
    }

    #[test]
    fn index_names() {
        assert_eq!(index_problem("orders-2024"), None);
        assert!(index_problem("Orders").is_some());
        assert!(index_problem("_orders").is_some());
        assert!(index_problem("a,b").is_some());
    }
}
