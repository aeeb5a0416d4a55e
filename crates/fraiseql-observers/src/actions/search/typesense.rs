//! Typesense: documents carry their id in `id`; one document is
//! `POST /collections/{index}/documents?action=upsert`, several one JSONL
//! `.../documents/import?action=upsert` with a result line per document; deletes go one by one.

use reqwest::Method;
use serde_json::{Map, Value};

use super::{delete_one_by_one, status_outcome, Endpoint};
use crate::actions::ActionError;

/// A run of upserts: one request, an outcome per document.
pub(super) async fn upsert(
    endpoint: &Endpoint,
    documents: &[&Map<String, Value>],
) -> Vec<Result<(), ActionError>> {
    if documents.len() != 1 {
        return import(endpoint, documents).await;
    }
    let body = serde_json::to_vec(documents[0]).expect("JSON values serialize");
    let outcome = endpoint
        .send(
            Method::POST,
            &["collections", &endpoint.index, "documents"],
            Some(("action", "upsert")),
            "application/json",
            body,
        )
        .await
        .and_then(|r| status_outcome(&r, false));
    vec![outcome]
}

/// A run of deletes, one request each.
pub(super) async fn delete(endpoint: &Endpoint, ids: &[&str]) -> Vec<Result<(), ActionError>> {
    delete_one_by_one(endpoint, "collections", ids).await
}

/// Typesense's JSONL import: one answer line per document, in order.
async fn import(
    endpoint: &Endpoint,
    documents: &[&Map<String, Value>],
) -> Vec<Result<(), ActionError>> {
    let mut body = String::new();
    for document in documents {
        body.push_str(&Value::Object((*document).clone()).to_string());
        body.push('\n');
    }
    let answer = endpoint
        .send(
            Method::POST,
            &["collections", &endpoint.index, "documents", "import"],
            Some(("action", "upsert")),
            "text/plain",
            body.into_bytes(),
        )
        .await
        .and_then(|r| status_outcome(&r, false).map(|_| r));
    let response = match answer {
        Ok(response) => response,
        Err(e) => return vec![Err(e); documents.len()],
    };
    let lines: Vec<Value> = String::from_utf8_lossy(&response.body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if lines.len() != documents.len() {
        let error = ActionError::transient(format!(
            "the import answer has {} result lines for {} documents",
            lines.len(),
            documents.len()
        ));
        return vec![Err(error); documents.len()];
    }
    lines.iter().map(import_line_outcome).collect()
}

/// One line of a Typesense import answer: `{"success": true}` or `{"success": false, "error":
/// ..., "code": 400}`.
fn import_line_outcome(line: &Value) -> Result<(), ActionError> {
    if line["success"].as_bool() == Some(true) {
        return Ok(());
    }
    let code = line["code"].as_u64().unwrap_or(400);
    let message = format!(
        "the engine refused the document ({code}: {})",
        line["error"]
            .as_str()
            .unwrap_or("no reason given")
            .chars()
            .take(200)
            .collect::<String>()
    );
    if code == 429 || code >= 500 {
        Err(ActionError::transient(message))
    } else {
        Err(ActionError::permanent(message))
    }
}
