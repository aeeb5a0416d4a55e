//! The search action against local servers that keep an in-memory index and answer as
//! Meilisearch, Elasticsearch/OpenSearch and Typesense do (paths, credentials, bodies, per-item
//! results, errors). After each sequence of creates, updates and deletes the test reads the
//! documents the server holds and compares them with what the entities are.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::http::Method;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use fraiseql_observers::actions::{Action, ActionError, DeliveryRequest, FailureKind};
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::testing::{self, Request, TestServer};
use fraiseql_observers::{ConfigError, EntityEvent, EventKind, Position};
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// A fake engine: an in-memory index per name behind the kit's test server (which keeps the
// request log and the answers queued to fail on purpose).

type Answer = (u16, String);
type Documents = BTreeMap<String, Value>;

#[derive(Default)]
struct EngineState {
    indexes: HashMap<String, Documents>,
    tasks: u64,
}

type Shared = Arc<Mutex<EngineState>>;
type Handler = fn(&mut EngineState, &Request) -> Answer;

struct FakeEngine {
    base: String,
    state: Shared,
    server: TestServer,
}

impl FakeEngine {
    async fn start(handler: Handler) -> FakeEngine {
        let state = Shared::default();
        let engine = state.clone();
        let server = TestServer::with(move |request: &Request| {
            let (status, body) = handler(&mut engine.lock().unwrap(), request);
            testing::Answer::status(status)
                .header("content-type", "application/json")
                .body(body)
        })
        .await;
        FakeEngine {
            base: server.base.clone(),
            state,
            server,
        }
    }

    /// The documents the engine holds in `index`.
    fn documents(&self, index: &str) -> Documents {
        self.state
            .lock()
            .unwrap()
            .indexes
            .get(index)
            .cloned()
            .unwrap_or_default()
    }

    fn received(&self) -> Vec<Request> {
        self.server.requests()
    }

    /// Answered (without touching the index) to the next request.
    fn fail_next(&self, status: u16, body: Value) {
        self.server.script([testing::Answer::json(status, &body)]);
    }
}

fn decode_segment(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn segments(request: &Request) -> Vec<String> {
    request
        .uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(decode_segment)
        .collect()
}

fn query(request: &Request, key: &str) -> Option<String> {
    request
        .uri
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| decode_segment(v))
}

/// A document the fake engines refuse (a field of the wrong type), and one they are too busy
/// to take.
fn refused(document: &Value) -> bool {
    document["price"] == "not a number"
}

fn overloaded(document: &Value) -> bool {
    document["name"] == "overload"
}

// -- Meilisearch ------------------------------------------------------------------------------

const MEILI_KEY: &str = "meili-master-key";

fn meilisearch(state: &mut EngineState, request: &Request) -> Answer {
    let meili_error = |status: u16, code: &str, message: &str, kind: &str| {
        (
            status,
            json!({"message": message, "code": code, "type": kind,
                   "link": format!("https://docs.meilisearch.com/errors#{code}")})
            .to_string(),
        )
    };
    match request
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap())
    {
        None => {
            return meili_error(
                401,
                "missing_authorization_header",
                "The Authorization header is missing. It must use the bearer authorization method.",
                "auth",
            )
        }
        Some(v) if v != format!("Bearer {MEILI_KEY}") => {
            return meili_error(
                403,
                "invalid_api_key",
                "The provided API key is invalid.",
                "auth",
            )
        }
        Some(_) => {}
    }
    state.tasks += 1;
    let task_uid = state.tasks;
    let segments = segments(request);
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let task = |uid: &str, kind: &str| {
        (
            202,
            json!({"taskUid": task_uid, "indexUid": uid, "status": "enqueued", "type": kind,
                   "enqueuedAt": "2024-05-01T12:30:00.000000Z"})
            .to_string(),
        )
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["indexes", uid, "documents"]) => {
            assert_eq!(request.required_header("content-type"), "application/json");
            let key = query(request, "primaryKey").expect("primaryKey");
            let documents: Vec<Value> = serde_json::from_slice(&request.body).unwrap();
            let answer = task(uid, "documentAdditionOrUpdate");
            let index = state.indexes.entry(uid.to_string()).or_default();
            for document in documents {
                let id = document[&key]
                    .as_str()
                    .expect("the primary key")
                    .to_string();
                index.insert(id, document);
            }
            answer
        }
        ("DELETE", ["indexes", uid, "documents", id]) => {
            let answer = task(uid, "documentDeletion");
            state
                .indexes
                .entry(uid.to_string())
                .or_default()
                .remove(*id);
            answer
        }
        ("POST", ["indexes", uid, "documents", "delete-batch"]) => {
            let ids: Vec<String> = serde_json::from_slice(&request.body).unwrap();
            let answer = task(uid, "documentDeletion");
            let index = state.indexes.entry(uid.to_string()).or_default();
            for id in ids {
                index.remove(&id);
            }
            answer
        }
        _ => meili_error(404, "not_found", "Not found", "invalid_request"),
    }
}

// -- Elasticsearch / OpenSearch ---------------------------------------------------------------

const ES_KEY: &str = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==";
const OPENSEARCH_USER: &str = "admin";
const OPENSEARCH_PASSWORD: &str = "correct horse";

fn bulk(state: &mut EngineState, request: &Request, credentials: &str) -> Answer {
    let es_error = |status: u16, kind: &str, reason: &str| {
        (
            status,
            json!({"error": {"root_cause": [{"type": kind, "reason": reason}],
                   "type": kind, "reason": reason}, "status": status})
            .to_string(),
        )
    };
    if request.headers.get("authorization").map(|v| v.as_bytes()) != Some(credentials.as_bytes()) {
        return es_error(
            401,
            "security_exception",
            "unable to authenticate user [unknown] for REST request [/_bulk]",
        );
    }
    if request.method != Method::POST || request.uri.path() != "/_bulk" {
        return es_error(400, "illegal_argument_exception", "unexpected request");
    }
    assert_eq!(
        request.required_header("content-type"),
        "application/x-ndjson"
    );
    let body = std::str::from_utf8(&request.body).unwrap();
    if !body.ends_with('\n') {
        return es_error(
            400,
            "illegal_argument_exception",
            "The bulk request must be terminated by a newline [\\n]",
        );
    }
    let mut lines = body.lines();
    let mut items = Vec::new();
    while let Some(line) = lines.next() {
        let action: Value = serde_json::from_str(line).unwrap();
        let (verb, meta) = action.as_object().unwrap().iter().next().unwrap();
        let index = meta["_index"].as_str().unwrap().to_string();
        let id = meta["_id"].as_str().unwrap().to_string();
        let documents = state.indexes.entry(index.clone()).or_default();
        let item = match verb.as_str() {
            "index" => {
                let document: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
                if refused(&document) {
                    json!({"_index": index, "_id": id, "status": 400, "error": {
                        "type": "document_parsing_exception",
                        "reason": "[1:10] failed to parse field [price] of type [long] in document with id '..'"}})
                } else if overloaded(&document) {
                    json!({"_index": index, "_id": id, "status": 429, "error": {
                        "type": "es_rejected_execution_exception",
                        "reason": "rejected execution of coordinating operation"}})
                } else {
                    let existed = documents.insert(id.clone(), document).is_some();
                    json!({"_index": index, "_id": id, "_version": 1,
                           "result": if existed { "updated" } else { "created" },
                           "status": if existed { 200 } else { 201 }})
                }
            }
            "delete" => match documents.remove(&id) {
                Some(_) => json!({"_index": index, "_id": id, "result": "deleted", "status": 200}),
                None => json!({"_index": index, "_id": id, "result": "not_found", "status": 404}),
            },
            other => panic!("unexpected bulk action {other}"),
        };
        items.push(json!({ verb.clone(): item }));
    }
    let errors = items.iter().any(|i| {
        i.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .get("error")
            .is_some()
    });
    (
        200,
        json!({"took": 3, "errors": errors, "items": items}).to_string(),
    )
}

fn elasticsearch(state: &mut EngineState, request: &Request) -> Answer {
    bulk(state, request, &format!("ApiKey {ES_KEY}"))
}

fn opensearch(state: &mut EngineState, request: &Request) -> Answer {
    let basic = BASE64.encode(format!("{OPENSEARCH_USER}:{OPENSEARCH_PASSWORD}"));
    bulk(state, request, &format!("Basic {basic}"))
}

// -- Typesense --------------------------------------------------------------------------------

const TYPESENSE_KEY: &str = "xyz-typesense";

fn typesense(state: &mut EngineState, request: &Request) -> Answer {
    let message = |status: u16, message: &str| (status, json!({ "message": message }).to_string());
    if request
        .headers
        .get("x-typesense-api-key")
        .map(|v| v.as_bytes())
        != Some(TYPESENSE_KEY.as_bytes())
    {
        return message(
            401,
            "Forbidden - a valid `x-typesense-api-key` header must be sent.",
        );
    }
    let segments = segments(request);
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["collections", collection, "documents"]) => {
            assert_eq!(query(request, "action").as_deref(), Some("upsert"));
            let document: Value = serde_json::from_slice(&request.body).unwrap();
            if refused(&document) {
                return message(400, "Field `price` must be an int64.");
            }
            let id = document["id"].as_str().expect("a string id").to_string();
            state
                .indexes
                .entry(collection.to_string())
                .or_default()
                .insert(id, document.clone());
            (201, document.to_string())
        }
        ("POST", ["collections", collection, "documents", "import"]) => {
            assert_eq!(query(request, "action").as_deref(), Some("upsert"));
            let index = state.indexes.entry(collection.to_string()).or_default();
            let lines: Vec<String> = std::str::from_utf8(&request.body)
                .unwrap()
                .lines()
                .map(|line| {
                    let document: Value = serde_json::from_str(line).unwrap();
                    if refused(&document) {
                        json!({"success": false, "error": "Field `price` must be an int64.",
                               "document": line, "code": 400})
                        .to_string()
                    } else {
                        let id = document["id"].as_str().unwrap().to_string();
                        index.insert(id, document);
                        json!({"success": true}).to_string()
                    }
                })
                .collect();
            (200, lines.join("\n"))
        }
        ("DELETE", ["collections", collection, "documents", id]) => {
            match state
                .indexes
                .entry(collection.to_string())
                .or_default()
                .remove(*id)
            {
                Some(document) => (200, document.to_string()),
                None => message(404, &format!("Could not find a document with id: {id}")),
            }
        }
        _ => message(404, "Not Found"),
    }
}

// ---------------------------------------------------------------------------------------------
// Entities and events.

fn entity(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_f0a2_0000_7000_8000_0000_0000_0000 + n)
}

fn event(n: u128, kind: EventKind, before: Option<Value>, after: Option<Value>) -> EntityEvent {
    EntityEvent {
        id: Uuid::new_v4(),
        sequence: 1,
        kind,
        entity_type: "Product".into(),
        entity_id: entity(n),
        tenant: None,
        author: None,
        before: before.map(Into::into),
        after: after.map(Into::into),
        change_status: "new".into(),
        extra_metadata: json!({}),
        source: None,
        created_at: chrono::Utc::now(),
        source_ts: None,
        position: Position {
            batch: 1,
            sequence: 1,
        },
    }
}

fn row(n: u128, name: &str, price: Value) -> Value {
    json!({"id": entity(n).to_string(), "sku": format!("SKU-{n}"), "name": name,
           "price": price, "internal_cost": 3})
}

fn created(n: u128, name: &str, price: i64) -> EntityEvent {
    event(
        n,
        EventKind::Created,
        None,
        Some(row(n, name, json!(price))),
    )
}

fn updated(n: u128, name: &str, price: i64) -> EntityEvent {
    event(
        n,
        EventKind::Updated,
        Some(row(n, "before", json!(0))),
        Some(row(n, name, json!(price))),
    )
}

fn deleted(n: u128) -> EntityEvent {
    event(n, EventKind::Deleted, Some(row(n, "gone", json!(0))), None)
}

/// A create the engines refuse (a price that is not a number).
fn refused_create(n: u128) -> EntityEvent {
    event(
        n,
        EventKind::Created,
        None,
        Some(row(n, "bad", json!("not a number"))),
    )
}

fn action(toml_src: &str, env: &[(&str, &str)]) -> Result<Action, Vec<ConfigError>> {
    crate::sample::compile_at(
        "observers.o.actions[0]",
        toml_src,
        &crate::sample::env_of(env),
        None,
        None,
    )
}

async fn run(action: &Action, event: &EntityEvent) -> Result<(), ActionError> {
    let id = delivery_id(event.id, "products", 0);
    action
        .execute(&DeliveryRequest {
            event,
            delivery_id: &id,
            attempt: 1,
        })
        .await
}

async fn run_batch(action: &Action, events: &[EntityEvent]) -> Vec<Result<(), ActionError>> {
    let ids: Vec<String> = events
        .iter()
        .map(|e| delivery_id(e.id, "products", 0))
        .collect();
    let requests: Vec<DeliveryRequest<'_>> = events
        .iter()
        .zip(&ids)
        .map(|(event, id)| DeliveryRequest {
            event,
            delivery_id: id,
            attempt: 1,
        })
        .collect();
    action
        .execute_batch(&requests)
        .await
        .unwrap_or_else(|| panic!("not an action that batches: {action:?}"))
}

fn ids(documents: &Documents) -> Vec<String> {
    documents.keys().cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// Meilisearch

fn meili_action(base: &str, extra: &str) -> Action {
    action(
        &format!(
            r#"type = "search"
               engine = "meilisearch"
               base_url = "{base}"
               index = "products"
               api_key_env = "MEILI_KEY"
               allow_private_networks = true
               {extra}"#
        ),
        &[("MEILI_KEY", MEILI_KEY)],
    )
    .unwrap()
}

#[tokio::test]
async fn meilisearch_index_follows_creates_updates_and_deletes() {
    let engine = FakeEngine::start(meilisearch).await;
    let search = meili_action(&engine.base, r#"fields = ["name", "price"]"#);

    for event in [
        created(1, "Lamp", 10),
        created(2, "Desk", 200),
        updated(1, "Lamp XL", 12),
        deleted(2),
        deleted(3),
    ] {
        run(&search, &event).await.unwrap();
    }

    let a = entity(1).to_string();
    assert_eq!(
        engine.documents("products"),
        BTreeMap::from([(a.clone(), json!({"id": a, "name": "Lamp XL", "price": 12}))]),
        "only the selected fields, the id under the primary key; the deleted entity is gone"
    );
    let received = engine.received();
    let targets: Vec<String> = received.iter().map(Request::target).collect();
    assert_eq!(
        targets,
        [
            "POST /indexes/products/documents?primaryKey=id".to_string(),
            "POST /indexes/products/documents?primaryKey=id".to_string(),
            "POST /indexes/products/documents?primaryKey=id".to_string(),
            format!("DELETE /indexes/products/documents/{}", entity(2)),
            format!("DELETE /indexes/products/documents/{}", entity(3)),
        ]
    );
    for request in &received {
        assert_eq!(
            request.required_header("authorization"),
            format!("Bearer {MEILI_KEY}")
        );
    }
    let first: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(
        first,
        json!([{"id": entity(1).to_string(), "name": "Lamp", "price": 10}])
    );
}

#[tokio::test]
async fn meilisearch_batches_runs_in_order_and_stops_at_a_failure() {
    let engine = FakeEngine::start(meilisearch).await;
    let search = meili_action(&engine.base, "");

    let results = run_batch(
        &search,
        &[
            created(1, "Lamp", 10),
            created(2, "Desk", 200),
            updated(1, "Lamp XL", 12),
            deleted(2),
            created(3, "Chair", 50),
            created(2, "Desk II", 210),
        ],
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let received = engine.received();
    assert_eq!(received.len(), 3, "one request per run");
    let bodies: Vec<Value> = received
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
        .collect();
    // First run: entity 1 once, at its latest state; entity 2 created.
    assert_eq!(bodies[0].as_array().unwrap().len(), 2);
    assert_eq!(bodies[0][0]["name"], "Lamp XL");
    assert_eq!(bodies[0][1]["name"], "Desk");
    assert_eq!(
        received[1].target(),
        format!("DELETE /indexes/products/documents/{}", entity(2))
    );
    assert_eq!(bodies[2][0]["name"], "Chair");
    assert_eq!(bodies[2][1]["name"], "Desk II");
    let documents = engine.documents("products");
    assert_eq!(
        documents
            .values()
            .map(|d| d["name"].clone())
            .collect::<Vec<_>>(),
        ["Lamp XL", "Desk II", "Chair"]
    );
    // The whole row is the document, its id under the primary key.
    assert_eq!(
        documents[&entity(3).to_string()],
        row(3, "Chair", json!(50))
    );

    // Several deletes go in one request.
    let results = run_batch(&search, &[deleted(1), deleted(3)]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let last = engine.received().pop().unwrap();
    assert_eq!(
        last.target(),
        "POST /indexes/products/documents/delete-batch"
    );
    let mut deleted_ids: Vec<String> = serde_json::from_slice(&last.body).unwrap();
    deleted_ids.sort();
    assert_eq!(deleted_ids, [entity(1).to_string(), entity(3).to_string()]);
    assert_eq!(ids(&engine.documents("products")), [entity(2).to_string()]);

    // The first request fails: nothing after it is sent, so the delete cannot overtake the
    // update it follows.
    let before = engine.received().len();
    engine.fail_next(
        503,
        json!({"message": "Meilisearch is overloaded", "code": "internal", "type": "internal"}),
    );
    let results = run_batch(&search, &[updated(2, "Desk III", 220), deleted(2)]).await;
    assert_eq!(engine.received().len(), before + 1);
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().is_retryable()),
        "{results:?}"
    );
    assert!(results[0]
        .as_ref()
        .unwrap_err()
        .message()
        .contains("overloaded"));
    assert_eq!(
        engine.documents("products")[&entity(2).to_string()]["name"],
        "Desk II"
    );
    // Retried, the batch lands in order.
    let results = run_batch(&search, &[updated(2, "Desk III", 220), deleted(2)]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(engine.documents("products").is_empty());
}

#[tokio::test]
async fn meilisearch_refusals_and_ids_it_would_reject_later() {
    let engine = FakeEngine::start(meilisearch).await;
    let search = meili_action(&engine.base, r#"id_template = "{{ after.sku }}""#);
    run(&search, &created(1, "Lamp", 10)).await.unwrap();
    assert_eq!(ids(&engine.documents("products")), ["SKU-1"]);

    // An id Meilisearch would refuse in its task queue (after answering 202) is refused here.
    let mut odd = created(2, "Desk", 1);
    odd.after.as_mut().unwrap()["sku"] = json!("SKU 2/b");
    let before = engine.received().len();
    let err = run(&search, &odd).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(
        err.message()
            .contains("not a valid Meilisearch document id"),
        "{err}"
    );
    assert_eq!(engine.received().len(), before);

    // A wrong key: permanent, with Meilisearch's code.
    let wrong = action(
        &format!(
            r#"type = "search"
               engine = "meilisearch"
               base_url = "{}"
               index = "products"
               api_key_env = "K"
               allow_private_networks = true"#,
            engine.base
        ),
        &[("K", "wrong")],
    )
    .unwrap();
    let err = run(&wrong, &created(3, "Chair", 5)).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(
        err.message().contains("403") && err.message().contains("invalid_api_key"),
        "{err}"
    );
    assert_eq!(ids(&engine.documents("products")), ["SKU-1"]);
}

// ---------------------------------------------------------------------------------------------
// Elasticsearch / OpenSearch

#[tokio::test]
async fn elasticsearch_sends_one_bulk_request_per_batch_and_reads_each_item() {
    let engine = FakeEngine::start(elasticsearch).await;
    let search = action(
        &format!(
            r#"type = "search"
               engine = "elasticsearch"
               base_url = "{}"
               index = "products"
               api_key_env = "ES_KEY"
               document_template = '{{"name": {{{{ after.name }}}}, "price": {{{{ after.price }}}}, "type": {{{{ event.entity_type }}}}}}'
               allow_private_networks = true"#,
            engine.base
        ),
        &[("ES_KEY", ES_KEY)],
    )
    .unwrap();

    let results = run_batch(&search, &[created(1, "Lamp", 10), created(2, "Desk", 200)]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let overload = created(5, "overload", 1);
    let results = run_batch(
        &search,
        &[
            updated(1, "Lamp XL", 12),
            refused_create(4),
            deleted(3),
            deleted(2),
            overload,
        ],
    )
    .await;

    let received = engine.received();
    assert_eq!(received.len(), 2, "one _bulk request per batch");
    assert_eq!(received[1].target(), "POST /_bulk");
    assert_eq!(
        received[1].required_header("authorization"),
        format!("ApiKey {ES_KEY}")
    );
    let lines: Vec<Value> = std::str::from_utf8(&received[1].body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"index": {"_index": "products", "_id": entity(1).to_string()}}),
            json!({"name": "Lamp XL", "price": 12, "type": "Product"}),
            json!({"index": {"_index": "products", "_id": entity(4).to_string()}}),
            json!({"name": "bad", "price": "not a number", "type": "Product"}),
            json!({"delete": {"_index": "products", "_id": entity(3).to_string()}}),
            json!({"delete": {"_index": "products", "_id": entity(2).to_string()}}),
            json!({"index": {"_index": "products", "_id": entity(5).to_string()}}),
            json!({"name": "overload", "price": 1, "type": "Product"}),
        ]
    );

    assert_eq!(results[0], Ok(()));
    let refused = results[1].as_ref().unwrap_err();
    assert!(refused.kind == FailureKind::Permanent, "{refused:?}");
    assert!(
        refused.message().contains("document_parsing_exception"),
        "{refused}"
    );
    assert_eq!(
        results[2],
        Ok(()),
        "deleting an absent document is a success"
    );
    assert_eq!(results[3], Ok(()));
    assert!(
        results[4].as_ref().unwrap_err().is_retryable(),
        "{:?}",
        results[4]
    );

    assert_eq!(
        engine.documents("products"),
        BTreeMap::from([(
            entity(1).to_string(),
            json!({"name": "Lamp XL", "price": 12, "type": "Product"})
        )])
    );

    // The whole request refused or failing: every event gets that outcome.
    engine.fail_next(
        503,
        json!({"error": {"type": "unavailable_shards_exception", "reason": "primary shard is not active"}, "status": 503}),
    );
    let results = run_batch(&search, &[created(6, "Rug", 5), deleted(1)]).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().is_retryable()),
        "{results:?}"
    );
    assert!(results[0]
        .as_ref()
        .unwrap_err()
        .message()
        .contains("primary shard"));
    assert_eq!(ids(&engine.documents("products")), [entity(1).to_string()]);
}

#[tokio::test]
async fn elasticsearch_wrong_credentials_are_permanent() {
    let engine = FakeEngine::start(elasticsearch).await;
    let search = action(
        &format!(
            r#"type = "search"
               engine = "elasticsearch"
               base_url = "{}"
               index = "products"
               api_key_env = "ES_KEY"
               allow_private_networks = true"#,
            engine.base
        ),
        &[("ES_KEY", "bm90LXRoZS1rZXk=")],
    )
    .unwrap();
    let results = run_batch(&search, &[created(1, "Lamp", 10), created(2, "Desk", 1)]).await;
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert!(err.kind == FailureKind::Permanent, "{err:?}");
        assert!(err.message().contains("security_exception"), "{err}");
    }
    assert!(engine.documents("products").is_empty());
}

#[tokio::test]
async fn opensearch_with_basic_auth() {
    let engine = FakeEngine::start(opensearch).await;
    let search = action(
        &format!(
            r#"type = "search"
               engine = "opensearch"
               base_url = "{}/"
               index = "products"
               username_env = "OS_USER"
               password_env = "OS_PASSWORD"
               fields = ["name"]
               allow_private_networks = true"#,
            engine.base
        ),
        &[
            ("OS_USER", OPENSEARCH_USER),
            ("OS_PASSWORD", OPENSEARCH_PASSWORD),
        ],
    )
    .unwrap();
    run(&search, &created(1, "Lamp", 10)).await.unwrap();
    run(&search, &created(2, "Desk", 10)).await.unwrap();
    assert_eq!(
        engine.documents("products")[&entity(1).to_string()],
        json!({"name": "Lamp"})
    );
    run(&search, &deleted(1)).await.unwrap();
    assert_eq!(ids(&engine.documents("products")), [entity(2).to_string()]);
    let received = engine.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.target() == "POST /_bulk"));
    assert!(received[0]
        .required_header("authorization")
        .starts_with("Basic "));
}

// ---------------------------------------------------------------------------------------------
// Typesense

fn typesense_action(base: &str, key: &str) -> Action {
    action(
        &format!(
            r#"type = "search"
               engine = "typesense"
               base_url = "{base}"
               index = "products"
               api_key_env = "TS_KEY"
               fields = ["name", "price"]
               allow_private_networks = true"#
        ),
        &[("TS_KEY", key)],
    )
    .unwrap()
}

#[tokio::test]
async fn typesense_upserts_imports_and_deletes() {
    let engine = FakeEngine::start(typesense).await;
    let search = typesense_action(&engine.base, TYPESENSE_KEY);

    run(&search, &created(1, "Lamp", 10)).await.unwrap();
    let first = &engine.received()[0];
    assert_eq!(
        first.target(),
        "POST /collections/products/documents?action=upsert"
    );
    assert_eq!(first.required_header("x-typesense-api-key"), TYPESENSE_KEY);
    assert_eq!(
        serde_json::from_slice::<Value>(&first.body).unwrap(),
        json!({"id": entity(1).to_string(), "name": "Lamp", "price": 10})
    );

    // Several upserts: one import, one answer line per document.
    let results = run_batch(
        &search,
        &[
            created(2, "Desk", 200),
            refused_create(4),
            updated(1, "Lamp XL", 12),
        ],
    )
    .await;
    let import = engine.received().pop().unwrap();
    assert_eq!(
        import.target(),
        "POST /collections/products/documents/import?action=upsert"
    );
    assert_eq!(
        std::str::from_utf8(&import.body).unwrap().lines().count(),
        3
    );
    assert_eq!(results[0], Ok(()));
    let refused = results[1].as_ref().unwrap_err();
    assert!(refused.kind == FailureKind::Permanent, "{refused:?}");
    assert!(refused.message().contains("must be an int64"), "{refused}");
    assert_eq!(results[2], Ok(()));

    // Deletes, one request each; an absent document is already deleted.
    let results = run_batch(&search, &[deleted(2), deleted(9)]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        engine.documents("products"),
        BTreeMap::from([(
            entity(1).to_string(),
            json!({"id": entity(1).to_string(), "name": "Lamp XL", "price": 12})
        )])
    );

    // A single refused document and a wrong key.
    let err = run(&search, &refused_create(5)).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    let wrong = typesense_action(&engine.base, "nope");
    let err = run(&wrong, &created(6, "Rug", 1)).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("401"), "{err}");
    assert_eq!(ids(&engine.documents("products")), [entity(1).to_string()]);
}

// ---------------------------------------------------------------------------------------------
// Configuration errors

#[test]
fn search_config_errors_are_reported_with_their_paths() {
    let errors = |toml_src: &str, env: &[(&str, &str)]| -> Vec<(String, String)> {
        action(toml_src, env)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.path.replace("observers.o.actions[0].", ""), e.message))
            .collect()
    };
    let paths = |errors: &[(String, String)]| -> Vec<String> {
        errors.iter().map(|(p, _)| p.clone()).collect()
    };

    let e = errors(r#"type = "search""#, &[]);
    assert_eq!(paths(&e), ["engine", "base_url", "index"], "{e:?}");
    let e = errors(
        r#"type = "search"
           engine = "solr"
           base_url = "https://s.example.com"
           index = "products""#,
        &[],
    );
    assert_eq!(paths(&e), ["engine"]);
    assert!(
        e[0].1.contains(
            "unknown engine 'solr'; one of: meilisearch, elasticsearch, opensearch, typesense"
        ),
        "{e:?}"
    );
    let e = errors(
        r#"type = "search"
           engine = "typesense"
           base_url = "https://s.example.com"
           index = "products"
           api_key_env = "TS_KEY""#,
        &[],
    );
    assert_eq!(paths(&e), ["api_key_env"]);
    assert!(e[0].1.contains("'TS_KEY' is not set"), "{e:?}");
    let e = errors(
        r#"type = "search"
           engine = "elasticsearch"
           base_url = "https://s.example.com"
           index = "Products"
           fields = ["name"]
           document_template = '{"a": 1}'
           id_template = "{{ afterr.id }}""#,
        &[],
    );
    assert_eq!(paths(&e), ["index", "id_template", "fields"], "{e:?}");
}
