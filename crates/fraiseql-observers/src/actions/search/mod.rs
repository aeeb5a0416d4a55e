//! The search action: keep a search index in step with the entities (Meilisearch,
//! Elasticsearch, OpenSearch, Typesense).
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "search"
//! engine = "elasticsearch"                  # meilisearch | elasticsearch | opensearch | typesense
//! base_url = "https://search.example.com:9200"
//! index = "orders"                          # the index (Typesense: the collection)
//! api_key_env = "SEARCH_API_KEY"            # or username_env + password_env (ES, OpenSearch)
//! id_template = "{{ event.entity_id }}"     # the default
//! fields = ["id", "email", "status", "total"]   # or document_template = '{"email": {{ after.email }}}'
//! timeout_ms = 10000
//! ```
//!
//! The shared part is here (configuration, the document and id of each event, the batch and its
//! outcomes, the one request helper); what differs per engine is in its own file:
//! `elasticsearch.rs` (Elasticsearch and OpenSearch: `_bulk`), `meilisearch.rs`, `typesense.rs`.
//!
//! Invariants:
//!
//! * A create, an update, or a `CUSTOM` event (a re-read of the current state) upserts the
//!   entity's document, replacing it whole; a delete removes it. Deleting a document that is
//!   not there is a success. Nothing else is interpreted: a soft delete (an update that sets
//!   `deleted_at`) is an update like any other; filter it with the observer's condition and a
//!   second observer if the index must drop such rows.
//! * The document is the event's row (`data`: the after-image), or the `fields` selected from it,
//!   or the rendered `document_template` (JSON mode, must be an object). Its id is the rendered
//!   `id_template` (default: the entity id). Meilisearch and Typesense keep the id inside the
//!   document: it is written to `primary_key` (Meilisearch, default `id`) or `id` (Typesense),
//!   replacing any value the row has there.
//! * Requests: Meilisearch `POST /indexes/{index}/documents?primaryKey=...` (an array),
//!   `DELETE /indexes/{index}/documents/{id}`, `POST .../documents/delete-batch`, with
//!   `Authorization: Bearer`; Elasticsearch and OpenSearch `POST /_bulk` (NDJSON `index` and
//!   `delete` actions), with `Authorization: ApiKey` (Elasticsearch) or Basic; Typesense
//!   `POST /collections/{index}/documents?action=upsert`, `.../documents/import?action=upsert`
//!   (JSONL), `DELETE /collections/{index}/documents/{id}`, with `X-TYPESENSE-API-KEY`.
//! * [`Search::execute_batch`] sends several events in as few requests as the engine allows, in
//!   their order: one `_bulk` request for Elasticsearch and OpenSearch (the engine applies its
//!   actions in order); for Meilisearch and Typesense, the events are cut into runs of
//!   consecutive upserts and consecutive deletes, one request per run, runs sent one after the
//!   other (within a run of upserts, a later event of the same id replaces an earlier one).
//!   Once a request fails, the requests after it are not sent (their events get a transient
//!   error): a later change of an entity never overtakes an earlier one.
//! * Outcomes are per event: a `_bulk` item's status (429 and 5xx transient, other 4xx
//!   permanent), a Typesense import line's `success`/`code`, or the status of the request that
//!   carried the event (see [`super::http::classify`]).
//! * Meilisearch answers `202 Accepted` with a task: the documents are queued, and the engine
//!   applies them later. That is taken as success (the index converges once Meilisearch
//!   processes its queue). To keep the asynchronous failures it cannot see rare, the action
//!   checks what Meilisearch would refuse before sending: a document id must be 1-511 bytes of
//!   `A-Z a-z 0-9 - _`.

mod elasticsearch;
mod meilisearch;
mod typesense;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{classify, HttpClient, HttpRequest, HttpResponse, SendOptions, Target};
use super::{secret_from_env, timeout_setting, ActionError, CompileContext, DeliveryRequest};
use crate::error::ConfigError;
use crate::event::{EntityEvent, EventKind};
use crate::template::{EventContext, Template, TemplateMode};

/// The engines, as `engine` names them.
pub const ENGINES: &[&str] = &["meilisearch", "elasticsearch", "opensearch", "typesense"];

/// The most of a bulk answer that is read (its per-item results).
const ANSWER_LIMIT: usize = 16 * 1024 * 1024;

/// The search action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    pub engine: Option<String>,
    pub base_url: Option<String>,
    pub index: Option<String>,
    pub api_key_env: Option<String>,
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub id_template: Option<String>,
    pub document_template: Option<String>,
    pub fields: Option<Vec<String>>,
    pub primary_key: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub allow_private_networks: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SearchEngine {
    Meilisearch,
    Elasticsearch,
    OpenSearch,
    Typesense,
}

impl SearchEngine {
    fn name(self) -> &'static str {
        match self {
            SearchEngine::Meilisearch => "meilisearch",
            SearchEngine::Elasticsearch => "elasticsearch",
            SearchEngine::OpenSearch => "opensearch",
            SearchEngine::Typesense => "typesense",
        }
    }
}

/// How the document is made from the event.
#[derive(Debug)]
enum DocumentShape {
    /// The whole row.
    Row,
    /// These top-level fields of the row.
    Fields(Vec<String>),
    Template(Template),
}

/// A compiled search action.
pub struct Search {
    engine: SearchEngine,
    endpoint: Endpoint,
    id: Option<Template>,
    document: DocumentShape,
    primary_key: String,
}

/// Where the index is, and how requests reach it (shared by the engines' files).
struct Endpoint {
    http: HttpClient,
    base: Url,
    allow_private_networks: bool,
    index: String,
    auth: Option<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

impl fmt::Debug for Search {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.endpoint;
        f.debug_struct("Search")
            .field("engine", &self.engine)
            .field("base_url", &e.base.as_str())
            .field("index", &e.index)
            .field("auth", &e.auth.as_ref().map(|(name, _)| name))
            .field("id_template", &self.id.is_some())
            .field("document", &self.document)
            .field("primary_key", &self.primary_key)
            .field("timeout", &e.timeout)
            .finish()
    }
}

/// Compile a search configuration. Pure; reports every error with its path.
pub fn compile(
    config: &SearchConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Search, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let at = |key: &str| format!("{path}.{key}");

    let engine = match config.engine.as_deref() {
        None => {
            errors.push(ConfigError::new(
                at("engine"),
                format!("missing; one of: {}", ENGINES.join(", ")),
            ));
            None
        }
        Some("meilisearch") => Some(SearchEngine::Meilisearch),
        Some("elasticsearch") => Some(SearchEngine::Elasticsearch),
        Some("opensearch") => Some(SearchEngine::OpenSearch),
        Some("typesense") => Some(SearchEngine::Typesense),
        Some(other) => {
            errors.push(ConfigError::new(
                at("engine"),
                format!("unknown engine '{other}'; one of: {}", ENGINES.join(", ")),
            ));
            None
        }
    };

    let base = match config.base_url.as_deref() {
        None => {
            errors.push(ConfigError::new(
                at("base_url"),
                "missing; the engine's URL (https://search.example.com:9200)",
            ));
            None
        }
        Some(raw) => match Target::parse(raw, false, config.allow_private_networks) {
            Ok(target) if target.url().query().is_none() => Some(target.url().clone()),
            Ok(_) => {
                errors.push(ConfigError::new(
                    at("base_url"),
                    "must not have a query string",
                ));
                None
            }
            Err(e) => {
                errors.push(ConfigError::new(at("base_url"), e));
                None
            }
        },
    };

    let index = match config.index.as_deref().map(str::trim) {
        None => {
            errors.push(ConfigError::new(at("index"), "missing; the index name"));
            None
        }
        Some(name) => match index_name_problem(name, engine) {
            None => Some(name.to_string()),
            Some(problem) => {
                errors.push(ConfigError::new(at("index"), problem));
                None
            }
        },
    };

    let auth = engine.and_then(|engine| auth(config, engine, path, ctx.env, &mut errors));

    let id = config.id_template.as_deref().and_then(|source| {
        Template::compile(source, TemplateMode::Text)
            .map_err(|e| errors.push(ConfigError::new(at("id_template"), e.to_string())))
            .ok()
    });

    let document = match (&config.fields, &config.document_template) {
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                at("fields"),
                "set either 'fields' or 'document_template', not both",
            ));
            None
        }
        (Some(fields), None) => {
            if fields.is_empty() || fields.iter().any(|f| f.trim().is_empty()) {
                errors.push(ConfigError::new(
                    at("fields"),
                    "must list at least one field name, none of them empty",
                ));
            }
            Some(DocumentShape::Fields(fields.clone()))
        }
        (None, Some(source)) => Template::compile(source, TemplateMode::Json)
            .map(DocumentShape::Template)
            .map_err(|e| errors.push(ConfigError::new(at("document_template"), e.to_string())))
            .ok(),
        (None, None) => Some(DocumentShape::Row),
    };

    let primary_key = match (&config.primary_key, engine) {
        (None, _) => "id".to_string(),
        (Some(key), Some(SearchEngine::Meilisearch)) => {
            if meilisearch::valid_id(key) {
                key.clone()
            } else {
                errors.push(ConfigError::new(
                    at("primary_key"),
                    format!("'{key}' is not a valid Meilisearch attribute name for a primary key"),
                ));
                "id".to_string()
            }
        }
        (Some(_), Some(engine)) => {
            errors.push(ConfigError::new(
                at("primary_key"),
                format!(
                    "only for engine 'meilisearch' ({} keeps the id {})",
                    engine.name(),
                    if engine == SearchEngine::Typesense {
                        "in the field 'id'"
                    } else {
                        "outside the document"
                    }
                ),
            ));
            "id".to_string()
        }
        (Some(_), None) => "id".to_string(),
    };

    let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

    match (errors.is_empty(), engine, base, index, document) {
        (true, Some(engine), Some(base), Some(index), Some(document)) => Ok(Search {
            engine,
            endpoint: Endpoint {
                http: ctx.http.clone(),
                base,
                allow_private_networks: config.allow_private_networks,
                index,
                auth,
                timeout,
            },
            id,
            document,
            primary_key,
        }),
        _ => Err(errors),
    }
}

/// Why `name` cannot be an index name, if it cannot.
fn index_name_problem(name: &str, engine: Option<SearchEngine>) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) || name.contains(['/', '?', '#']) {
        return Some(format!(
            "'{name}' cannot be an index name (no spaces, '/', '?' or '#')"
        ));
    }
    match engine {
        Some(SearchEngine::Elasticsearch | SearchEngine::OpenSearch) => {
            elasticsearch::index_problem(name)
        }
        Some(SearchEngine::Meilisearch) => meilisearch::index_problem(name),
        Some(SearchEngine::Typesense) | None => None,
    }
}

/// The credentials header of each engine.
fn auth(
    config: &SearchConfig,
    engine: SearchEngine,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<(HeaderName, HeaderValue)> {
    let basic_allowed = matches!(
        engine,
        SearchEngine::Elasticsearch | SearchEngine::OpenSearch
    );
    let basic_set = config.username_env.is_some() || config.password_env.is_some();
    if basic_set && !basic_allowed {
        let key = if config.username_env.is_some() {
            "username_env"
        } else {
            "password_env"
        };
        errors.push(ConfigError::new(
            format!("{path}.{key}"),
            format!(
                "engine '{}' does not use a user name and password; use api_key_env",
                engine.name()
            ),
        ));
        return None;
    }
    if config.api_key_env.is_some() && engine == SearchEngine::OpenSearch {
        errors.push(ConfigError::new(
            format!("{path}.api_key_env"),
            "OpenSearch authenticates with username_env and password_env",
        ));
        return None;
    }
    if config.api_key_env.is_some() && basic_set {
        errors.push(ConfigError::new(
            format!("{path}.api_key_env"),
            "set either api_key_env or username_env and password_env, not both",
        ));
        return None;
    }
    let sensitive = |name: HeaderName, value: String| {
        let mut value = HeaderValue::from_str(&value).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    };
    let invalid = |key: &str, errors: &mut Vec<ConfigError>| {
        errors.push(ConfigError::new(
            format!("{path}.{key}"),
            "the secret is not a valid header value (control characters or non-ASCII text)",
        ));
        None
    };
    if basic_set {
        let user_path = format!("{path}.username_env");
        let password_path = format!("{path}.password_env");
        let user = match config.username_env.as_deref() {
            Some(var) => secret_from_env(var, &user_path, env, errors),
            None => {
                errors.push(ConfigError::new(
                    user_path,
                    "missing; password_env is set, so username_env must be too",
                ));
                None
            }
        };
        let password = match config.password_env.as_deref() {
            Some(var) => secret_from_env(var, &password_path, env, errors),
            None => {
                errors.push(ConfigError::new(
                    password_path,
                    "missing; username_env is set, so password_env must be too",
                ));
                None
            }
        };
        let credentials = BASE64.encode(format!("{}:{}", user?, password?));
        return sensitive(AUTHORIZATION, format!("Basic {credentials}"))
            .or_else(|| invalid("password_env", errors));
    }
    let key_path = format!("{path}.api_key_env");
    let key = match config.api_key_env.as_deref() {
        Some(var) => secret_from_env(var, &key_path, env, errors)?,
        None if engine == SearchEngine::Typesense => {
            errors.push(ConfigError::new(
                key_path,
                "missing; Typesense requires an API key (X-TYPESENSE-API-KEY)",
            ));
            return None;
        }
        None => return None,
    };
    let header = match engine {
        SearchEngine::Meilisearch => (AUTHORIZATION, format!("Bearer {key}")),
        SearchEngine::Elasticsearch => (AUTHORIZATION, format!("ApiKey {key}")),
        SearchEngine::Typesense => (
            HeaderName::from_static("x-typesense-api-key"),
            key.to_string(),
        ),
        SearchEngine::OpenSearch => return None,
    };
    sensitive(header.0, header.1).or_else(|| invalid("api_key_env", errors))
}

/// What one event asks of the index.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Operation {
    Upsert {
        id: String,
        document: Map<String, Value>,
    },
    Delete {
        id: String,
    },
}

impl Operation {
    pub(super) fn id(&self) -> &str {
        match self {
            Operation::Upsert { id, .. } | Operation::Delete { id } => id,
        }
    }
}

/// The outcome of each event of a batch, filled as requests are answered.
pub(super) struct Outcomes(Vec<Option<Result<(), ActionError>>>);

impl Outcomes {
    pub(super) fn set(&mut self, slot: usize, outcome: Result<(), ActionError>) {
        self.0[slot] = Some(outcome);
    }
}

impl Search {
    pub(crate) fn endpoint(&self) -> String {
        super::http::host_port(&self.endpoint.base)
    }

    /// Apply one event to the index. `Ok` only when the engine accepted it.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        self.execute_batch(std::slice::from_ref(request))
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Apply several events, in their order, in as few requests as the engine allows (see the
    /// module docs). One result per request, in the same order.
    pub async fn execute_batch(
        &self,
        requests: &[DeliveryRequest<'_>],
    ) -> Vec<Result<(), ActionError>> {
        let label = format!("search ({} {})", self.engine.name(), self.endpoint.index);
        let mut outcomes = Outcomes(vec![None; requests.len()]);
        let mut operations = Vec::new();
        for (slot, request) in requests.iter().enumerate() {
            match self.operation(request.event) {
                Ok(op) => operations.push((slot, op)),
                Err(e) => outcomes.set(slot, Err(e)),
            }
        }
        if !operations.is_empty() {
            match self.engine {
                SearchEngine::Elasticsearch | SearchEngine::OpenSearch => {
                    elasticsearch::bulk(&self.endpoint, &operations, &mut outcomes).await
                }
                SearchEngine::Meilisearch | SearchEngine::Typesense => {
                    self.in_runs(&operations, &mut outcomes).await
                }
            }
        }
        let results: Vec<Result<(), ActionError>> = outcomes
            .0
            .into_iter()
            .map(|outcome| {
                outcome
                    .unwrap_or_else(|| {
                        Err(ActionError::permanent(
                            "no outcome was recorded for this event",
                        ))
                    })
                    .map_err(|e| e.context(&label))
            })
            .collect();
        for (request, result) in requests.iter().zip(&results) {
            tracing::debug!(
                action = "search",
                engine = self.engine.name(),
                index = %self.endpoint.index,
                delivery_id = request.delivery_id,
                attempt = request.attempt,
                ok = result.is_ok(),
                "search index updated"
            );
        }
        results
    }

    /// The operation an event asks for: its id and, for an upsert, its document.
    fn operation(&self, event: &EntityEvent) -> Result<Operation, ActionError> {
        let context = EventContext::new(event);
        let id = match &self.id {
            None => event.entity_id.to_string(),
            Some(template) => template
                .render_context(&context)
                .map_err(|e| {
                    ActionError::permanent(format!("id_template cannot render this event: {e}"))
                })?
                .trim()
                .to_string(),
        };
        if id.is_empty() {
            return Err(ActionError::permanent(
                "id_template rendered an empty document id",
            ));
        }
        if id.len() > 512 {
            return Err(ActionError::permanent(format!(
                "the document id is {} bytes long (at most 512)",
                id.len()
            )));
        }
        if self.engine == SearchEngine::Meilisearch {
            meilisearch::check_id(&id)?;
        }
        if event.kind == EventKind::Deleted {
            return Ok(Operation::Delete { id });
        }
        let row = match event.data() {
            Value::Object(row) => Some(row),
            _ => None,
        };
        let mut document = match &self.document {
            DocumentShape::Row => row.cloned().ok_or_else(no_row)?,
            DocumentShape::Fields(fields) => {
                let row = row.ok_or_else(no_row)?;
                fields
                    .iter()
                    .filter_map(|f| row.get(f).map(|v| (f.clone(), v.clone())))
                    .collect()
            }
            DocumentShape::Template(template) => {
                let rendered = template.render_context(&context).map_err(|e| {
                    ActionError::permanent(format!(
                        "document_template cannot render this event: {e}"
                    ))
                })?;
                match serde_json::from_str::<Value>(&rendered) {
                    Ok(Value::Object(document)) => document,
                    _ => {
                        return Err(ActionError::permanent(
                            "document_template must render a JSON object",
                        ))
                    }
                }
            }
        };
        match self.engine {
            SearchEngine::Meilisearch => {
                document.insert(self.primary_key.clone(), json!(id));
            }
            SearchEngine::Typesense => {
                document.insert("id".into(), json!(id));
            }
            SearchEngine::Elasticsearch | SearchEngine::OpenSearch => {}
        }
        Ok(Operation::Upsert { id, document })
    }

    // -----------------------------------------------------------------------------------------
    // Meilisearch / Typesense: runs of upserts and runs of deletes, in order.

    async fn in_runs(&self, operations: &[(usize, Operation)], outcomes: &mut Outcomes) {
        let mut rest = operations;
        while let Some((_, first)) = rest.first() {
            let upserts = matches!(first, Operation::Upsert { .. });
            let len = rest
                .iter()
                .take_while(|(_, op)| matches!(op, Operation::Upsert { .. }) == upserts)
                .count();
            let (run, after) = rest.split_at(len);
            rest = after;
            let failed = if upserts {
                self.upsert_run(run, outcomes).await
            } else {
                self.delete_run(run, outcomes).await
            };
            if failed {
                for (slot, _) in rest {
                    outcomes.set(
                        *slot,
                        Err(ActionError::transient(
                            "not sent: an earlier request of the same batch failed, and \
                             changes are applied in order",
                        )),
                    );
                }
                return;
            }
        }
    }

    /// One request for a run of upserts. Returns whether any of them failed.
    async fn upsert_run(&self, run: &[(usize, Operation)], outcomes: &mut Outcomes) -> bool {
        // Later events of the same id replace earlier ones: each event maps to the document
        // that carries its final state.
        let mut position: HashMap<&str, usize> = HashMap::new();
        let mut documents: Vec<&Map<String, Value>> = Vec::new();
        let mut carried_by = Vec::with_capacity(run.len());
        for (_, op) in run {
            if let Operation::Upsert { id, document } = op {
                match position.get(id.as_str()) {
                    Some(&at) => documents[at] = document,
                    None => {
                        position.insert(id, documents.len());
                        documents.push(document);
                    }
                }
                carried_by.push(position[id.as_str()]);
            }
        }
        let per_document = match self.engine {
            SearchEngine::Meilisearch => {
                meilisearch::upsert(&self.endpoint, &self.primary_key, &documents).await
            }
            _ => typesense::upsert(&self.endpoint, &documents).await,
        };
        let mut failed = false;
        for ((slot, _), at) in run.iter().zip(carried_by) {
            let outcome = per_document[at].clone();
            failed |= outcome.is_err();
            outcomes.set(*slot, outcome);
        }
        failed
    }

    /// A run of deletes. Returns whether any of them failed.
    async fn delete_run(&self, run: &[(usize, Operation)], outcomes: &mut Outcomes) -> bool {
        let ids: Vec<&str> = run.iter().map(|(_, op)| op.id()).collect();
        let results = match self.engine {
            SearchEngine::Meilisearch => meilisearch::delete(&self.endpoint, &ids).await,
            _ => typesense::delete(&self.endpoint, &ids).await,
        };
        let mut failed = false;
        for ((slot, _), outcome) in run.iter().zip(results) {
            failed |= outcome.is_err();
            outcomes.set(*slot, outcome);
        }
        failed
    }
}

impl Endpoint {
    /// One request to `base_url/{segments...}?{query}`, with the credentials.
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: Option<(&str, &str)>,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<HttpResponse, ActionError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| ActionError::permanent("base_url cannot have a path"))?
            .pop_if_empty()
            .extend(segments);
        if let Some((key, value)) = query {
            url.query_pairs_mut().append_pair(key, value);
        }
        let target = Target::parse(url.as_str(), false, self.allow_private_networks)
            .map_err(ActionError::permanent)?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some((name, value)) = &self.auth {
            headers.insert(name.clone(), value.clone());
        }
        self.http
            .send_with(
                HttpRequest {
                    method,
                    target: &target,
                    headers,
                    body,
                    timeout: self.timeout,
                },
                SendOptions {
                    body_limit: Some(ANSWER_LIMIT),
                    ..SendOptions::default()
                },
            )
            .await
            .map_err(|e| e.context(target.shown()))
    }
}

/// `DELETE {collection}/{index}/documents/{id}` for each id, in order; after a failure the rest
/// are not sent (a transient error each).
async fn delete_one_by_one(
    endpoint: &Endpoint,
    collection: &str,
    ids: &[&str],
) -> Vec<Result<(), ActionError>> {
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        if results.iter().any(Result::is_err) {
            results.push(Err(ActionError::transient(
                "not sent: an earlier request of the same batch failed",
            )));
            continue;
        }
        let outcome = endpoint
            .send(
                Method::DELETE,
                &[collection, &endpoint.index, "documents", id],
                None,
                "application/json",
                Vec::new(),
            )
            .await
            .and_then(|r| status_outcome(&r, true));
        results.push(outcome);
    }
    results
}

fn no_row() -> ActionError {
    ActionError::permanent("the event has no row to index")
}

/// The outcome of a whole request, by its status; a 404 is a success for a delete (the
/// document is already gone). The engine's error message is kept.
pub(super) fn status_outcome(response: &HttpResponse, delete: bool) -> Result<(), ActionError> {
    if delete && response.status == StatusCode::NOT_FOUND {
        return Ok(());
    }
    classify(response.status, &response.headers).map_err(|e| {
        let detail = engine_message(&response.body).unwrap_or_else(|| response.body_snippet(200));
        e.detail(&detail)
    })
}

/// The error message of an engine's JSON answer (`message`, `error.reason`, `error`).
fn engine_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = value["message"]
        .as_str()
        .or_else(|| value["error"]["reason"].as_str())
        .or_else(|| value["error"].as_str())?;
    let code = value["code"]
        .as_str()
        .or_else(|| value["error"]["type"].as_str());
    let text: String = text.chars().take(200).collect();
    Some(match code {
        Some(code) => format!("{code}: {text}"),
        None => text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "SEARCH_API_KEY").then(|| "c2VjcmV0OmtleQ==".to_string())
    }

    #[test]
    fn doc_example_compiles() {
        let table = crate::actions::tests::doc_example(include_str!("mod.rs"));
        let config = match crate::actions::ActionConfig::parse(&table, "p")
            .unwrap()
            .settings
        {
            crate::actions::Settings::Search(c) => c,
            other => panic!("{other:?}"),
        };
        let search = compile(&config, "p", &CompileContext::new(&env)).unwrap();
        assert_eq!(search.engine, SearchEngine::Elasticsearch);
        assert_eq!(search.endpoint.index, "orders");
        let (name, value) = search.endpoint.auth.as_ref().unwrap();
        assert_eq!(name, AUTHORIZATION);
        assert_eq!(value, "ApiKey c2VjcmV0OmtleQ==");
        assert!(!format!("{search:?}").contains("c2VjcmV0"));
        assert!(matches!(&search.document, DocumentShape::Fields(f) if f.len() == 4));
    }

    #[test]
    fn compile_reports_every_error() {
        let config = SearchConfig {
            engine: Some("solr".into()),
            base_url: Some("ftp://x".into()),
            index: Some("a b".into()),
            fields: Some(vec![]),
            document_template: Some("{}".into()),
            timeout_ms: Some(0),
            ..Default::default()
        };
        let errors = compile(&config, "p", &CompileContext::new(&|_| None)).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "p.engine",
                "p.base_url",
                "p.index",
                "p.fields",
                "p.timeout_ms"
            ],
            "{errors:#?}"
        );

        let config = SearchConfig {
            engine: Some("typesense".into()),
            base_url: Some("https://ts.example.com".into()),
            index: Some("orders".into()),
            primary_key: Some("sku".into()),
            username_env: Some("U".into()),
            ..Default::default()
        };
        let errors = compile(&config, "p", &CompileContext::new(&|_| None)).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["p.username_env", "p.primary_key"], "{errors:#?}");

        let config = SearchConfig {
            engine: Some("typesense".into()),
            base_url: Some("https://ts.example.com".into()),
            index: Some("orders".into()),
            ..Default::default()
        };
        let errors = compile(&config, "p", &CompileContext::new(&|_| None)).unwrap_err();
        assert_eq!(errors[0].path, "p.api_key_env");
        assert!(errors[0].message.contains("X-TYPESENSE-API-KEY"));

        let config = SearchConfig {
            engine: Some("elasticsearch".into()),
            base_url: Some("https://es.example.com".into()),
            index: Some("Orders".into()),
            username_env: Some("U".into()),
            ..Default::default()
        };
        let errors = compile(&config, "p", &CompileContext::new(&|_| None)).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["p.index", "p.username_env", "p.password_env"]);
    }
}
