//! Templates over an [`EntityEvent`] (minijinja), compiled once at configuration load.
//!
//! Invariants:
//!
//! * A template is parsed once, by [`Template::compile`]; a syntax error is reported there, with
//!   its line and the offending source text, never at send time.
//! * The names a template may use are fixed and checked at compile time: `event`, `before`,
//!   `after`, `data`, `changes` (the same names the condition language uses), and the fields of
//!   `event` listed in [`EVENT_FIELDS`]. `{{ evnt.id }}` or `{{ event.entity }}` is a compile error
//!   naming the unknown variable.
//! * The fields of a row (`after.email`, `before.status`, `changes.total`) depend on the table and
//!   cannot be known at compile time: a field that is absent, or a lookup through an image that
//!   does not exist (`before.email` on a create), renders as `null` in JSON mode and as nothing in
//!   text mode. Chained lookups (`after.address.city`) follow the same rule
//!   (minijinja's "chainable" undefined). Test for presence with `{% if before %}` or
//!   `{{ after.email | default("n/a") }}`.
//! * [`TemplateMode::Json`] escapes by construction: every `{{ value }}` is emitted as a JSON value
//!   (a string comes out quoted and escaped, a map as an object), the `safe` filter is not
//!   available, and a rendered body that does not parse as JSON is a render error. So
//!   `{"email": {{ after.email }}}` stays valid JSON whatever the email contains. To build a string
//!   out of pieces, concatenate inside one expression: `{{ "order " ~ after.id ~ " paid" }}`.
//! * [`TemplateMode::Html`] HTML-escapes every printed value (for e-mail HTML bodies), so event
//!   data cannot add markup; `| safe` opts out for a value known to be HTML.
//! * [`TemplateMode::Key`] is text mode for keys: printing an absent or null value is a render
//!   error rather than an empty hole (`order:{{ after.id }}` on a delete would be `order:`).
//! * [`TemplateMode::Glob`] is key mode for Redis glob patterns: every printed value has the
//!   glob metacharacters `* ? [ ] \` backslash-escaped (see [`escape_glob`]), so only the
//!   template's own literal text can be a wildcard and no event value can widen a pattern.
//! * [`TemplateMode::Slack`] is text mode for Slack messages: every printed value has `&`, `<`
//!   and `>` escaped (see [`escape_slack`]), so event data cannot mention `<!channel>` or add a
//!   link; `| safe` opts out.
//! * Rendering reads only the event: no I/O, no clock, no environment.

use std::collections::BTreeSet;
use std::fmt;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::{json, Map, Value as Json};
use thiserror::Error;

use crate::event::EntityEvent;

/// The top-level variables of the template context.
pub const CONTEXT_NAMES: &[&str] = &["event", "before", "after", "data", "changes"];

/// The fields of `event` in the template context.
pub const EVENT_FIELDS: &[&str] = &[
    "id",
    "sequence",
    "kind",
    "op",
    "entity_type",
    "entity_id",
    "tenant",
    "author",
    "change_status",
    "created_at",
    "source_ts",
    "extra_metadata",
    "source",
];

/// minijinja's global functions, which a template may call without declaring them.
const GLOBAL_FUNCTIONS: &[&str] = &["range", "dict", "namespace", "debug"];

/// The name under which a template is stored in its environment.
const NAME: &str = "template";

/// How a template's output is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateMode {
    /// Plain text: values are printed as they are (`none` prints as `none`, absent as nothing).
    Text,
    /// JSON: every printed value is a JSON value, and the whole output must parse as JSON.
    Json,
    /// HTML: every printed value is HTML-escaped (`<` becomes `&lt;`); `| safe` opts out.
    Html,
    /// A key (Redis, cache): text mode, but a printed value that is absent or null is a render
    /// error, so a key is never silently cut short (`order:` instead of `order:7`).
    Key,
    /// A Redis glob pattern: like [`TemplateMode::Key`], and every printed value (`{{ ... }}`)
    /// has its glob metacharacters escaped, so only the literal text of the template is a
    /// wildcard.
    Glob,
    /// Slack message text: text mode, and every printed value has `&`, `<` and `>` escaped as
    /// Slack asks (see [`escape_slack`]), so event data cannot add mentions (`<!channel>`) or
    /// links (`<https://x|y>`); `| safe` opts out for a value known to be Slack markup.
    Slack,
}

#[derive(Debug, Error)]
pub enum TemplateError {
    /// The template does not parse, or names something the context does not have.
    #[error("{0}")]
    Syntax(String),
    /// Rendering failed for this event (a filter failed, or a JSON body did not parse).
    #[error("{0}")]
    Render(String),
}

/// A compiled template. Cheap to render; compile once, render for every event.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
    mode: TemplateMode,
}

impl Template {
    /// Parse `source` and check the names it uses. Errors carry the line and the source text.
    pub fn compile(source: &str, mode: TemplateMode) -> Result<Template, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        match mode {
            TemplateMode::Text => env.set_auto_escape_callback(|_| AutoEscape::None),
            TemplateMode::Html => env.set_auto_escape_callback(|_| AutoEscape::Html),
            TemplateMode::Key | TemplateMode::Glob => {
                env.set_auto_escape_callback(|_| AutoEscape::None);
                let glob = mode == TemplateMode::Glob;
                env.set_formatter(move |out, _state, value| {
                    if value.is_undefined() || value.is_none() {
                        return Err(minijinja::Error::new(
                            minijinja::ErrorKind::UndefinedError,
                            "a printed value is absent (or null) for this event, so the key would be incomplete",
                        ));
                    }
                    let text = value.to_string();
                    let text = if glob { escape_glob(&text) } else { text };
                    out.write_str(&text).map_err(minijinja::Error::from)
                });
            }
            TemplateMode::Slack => {
                env.set_auto_escape_callback(|_| AutoEscape::None);
                env.set_formatter(|out, _state, value| {
                    let text = value.to_string();
                    let text = if value.is_safe() {
                        text
                    } else {
                        escape_slack(&text)
                    };
                    out.write_str(&text).map_err(minijinja::Error::from)
                });
            }
            TemplateMode::Json => {
                env.set_auto_escape_callback(|_| AutoEscape::Json);
                env.remove_filter("safe");
                // An absent value is `null` in a JSON body, never an empty hole.
                env.set_formatter(|out, state, value| {
                    if value.is_undefined() {
                        out.write_str("null").map_err(minijinja::Error::from)
                    } else {
                        minijinja::escape_formatter(out, state, value)
                    }
                });
            }
        }
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TemplateError::Syntax(describe(&e, source)))?;
        let template = Template { env, mode };
        template.check_names()?;
        Ok(template)
    }

    /// The output mode this template was compiled with.
    pub fn mode(&self) -> TemplateMode {
        self.mode
    }

    /// Render for one event. For several templates over the same event, build the context once
    /// with [`EventContext::new`] and use [`Template::render_context`].
    pub fn render(&self, event: &EntityEvent) -> Result<String, TemplateError> {
        self.render_context(&EventContext::new(event))
    }

    /// Render against a context built once per event.
    pub fn render_context(&self, context: &EventContext) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        let out = template
            .render(&context.value)
            .map_err(|e| TemplateError::Render(describe_render(&e)))?;
        if self.mode == TemplateMode::Json {
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&out) {
                return Err(TemplateError::Render(format!(
                    "the rendered body is not valid JSON ({e}); print values with {{{{ value }}}} \
                     (they are emitted as JSON) and do not wrap them in quotes"
                )));
            }
        }
        Ok(out)
    }

    /// Every variable the template reads must exist in the context: a typo is a compile error.
    fn check_names(&self) -> Result<(), TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Syntax(e.to_string()))?;
        let mut unknown = BTreeSet::new();
        for name in template.undeclared_variables(true) {
            let mut parts = name.split('.');
            let root = parts.next().unwrap_or_default();
            if GLOBAL_FUNCTIONS.contains(&root) {
                continue;
            }
            if !CONTEXT_NAMES.contains(&root) {
                unknown.insert(root.to_string());
                continue;
            }
            if root == "event" {
                if let Some(field) = parts.next() {
                    if !EVENT_FIELDS.contains(&field) {
                        unknown.insert(format!("event.{field}"));
                    }
                }
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        let unknown: Vec<_> = unknown.into_iter().collect();
        Err(TemplateError::Syntax(format!(
            "unknown variable {}; the template can use {} and event.{{{}}}",
            unknown
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", "),
            CONTEXT_NAMES.join(", "),
            EVENT_FIELDS.join(", ")
        )))
    }
}

/// The template context of one event, built once and shared by every template rendered for it.
#[derive(Debug, Clone)]
pub struct EventContext {
    value: Value,
}

impl EventContext {
    /// The same context as `Value::from_serialize(context_json(event))`, built straight from
    /// the event (no intermediate JSON copy of the images).
    pub fn new(event: &EntityEvent) -> EventContext {
        EventContext {
            value: Value::from_serialize(ContextRef(event)),
        }
    }
}

/// [`context_json`] as a borrowing `Serialize`, keys in a sorted map's order.
struct ContextRef<'a>(&'a EntityEvent);

impl Serialize for ContextRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("after", &e.after)?;
        map.serialize_entry("before", &e.before)?;
        map.serialize_entry("changes", &Changes(e.changes().as_deref()))?;
        map.serialize_entry("data", e.data())?;
        map.serialize_entry("event", &EventRef(e))?;
        map.end()
    }
}

/// [`event_json`] as a borrowing `Serialize`, keys in a sorted map's order.
struct EventRef<'a>(&'a EntityEvent);

impl Serialize for EventRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut map = serializer.serialize_map(Some(13))?;
        map.serialize_entry("author", &e.author)?;
        map.serialize_entry("change_status", &e.change_status)?;
        map.serialize_entry("created_at", &Rfc3339(&e.created_at))?;
        map.serialize_entry("entity_id", &Shown(&e.entity_id))?;
        map.serialize_entry("entity_type", &e.entity_type)?;
        map.serialize_entry("extra_metadata", &e.extra_metadata)?;
        map.serialize_entry("id", &Shown(&e.id))?;
        map.serialize_entry("kind", e.kind.as_str())?;
        map.serialize_entry("op", e.kind.op())?;
        map.serialize_entry("sequence", &e.sequence)?;
        map.serialize_entry("source", &e.source)?;
        map.serialize_entry("source_ts", &e.source_ts.as_ref().map(Rfc3339))?;
        map.serialize_entry("tenant", &e.tenant.as_ref().map(Shown))?;
        map.end()
    }
}

/// `{field: {"new", "old"}}` in field order (as a sorted map, the last entry of a repeated field
/// winning), or `null`.
pub(crate) struct Changes<'a>(pub(crate) Option<&'a [crate::event::FieldChangeRef<'a>]>);

impl Serialize for Changes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(changes) = self.0 else {
            return serializer.serialize_none();
        };
        fn change<'a>(c: &crate::event::FieldChangeRef<'a>) -> OldNew<'a> {
            OldNew(c.old, c.new)
        }
        if changes.windows(2).all(|w| w[0].field < w[1].field) {
            serializer.collect_map(changes.iter().map(|c| (c.field, change(c))))
        } else {
            let sorted: std::collections::BTreeMap<&str, &crate::event::FieldChangeRef<'_>> =
                changes.iter().map(|c| (c.field, c)).collect();
            serializer.collect_map(sorted.into_iter().map(|(f, c)| (f, change(c))))
        }
    }
}

struct OldNew<'a>(Option<&'a serde_json::Value>, Option<&'a serde_json::Value>);

impl Serialize for OldNew<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("new", &self.1)?;
        map.serialize_entry("old", &self.0)?;
        map.end()
    }
}

/// A value written as the string its `Display` gives.
pub(crate) struct Shown<'a, T: fmt::Display>(pub(crate) &'a T);

impl<T: fmt::Display> Serialize for Shown<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self.0)
    }
}

pub(crate) struct Rfc3339<'a>(pub(crate) &'a chrono::DateTime<chrono::Utc>);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }
}

/// The context as JSON: `{event: {...}, before, after, data, changes}`. `changes` maps each
/// changed field to `{old, new}`, or is `null` when the event has no before-image.
pub fn context_json(event: &EntityEvent) -> Json {
    json!({
        "event": event_json(event),
        "before": event.before,
        "after": event.after,
        "data": event.data(),
        "changes": changes_json(event),
    })
}

/// The fields of `event` in the context (see [`EVENT_FIELDS`]).
pub fn event_json(event: &EntityEvent) -> Json {
    json!({
        "id": event.id.to_string(),
        "sequence": event.sequence,
        "kind": event.kind.as_str(),
        "op": event.kind.op(),
        "entity_type": event.entity_type,
        "entity_id": event.entity_id.to_string(),
        "tenant": event.tenant.map(|t| t.to_string()),
        "author": event.author,
        "change_status": event.change_status,
        "created_at": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        "source_ts": event
            .source_ts
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        "extra_metadata": event.extra_metadata,
        "source": event.source,
    })
}

/// `changes` as `{field: {old, new}}`, or `null` when it cannot be known.
pub fn changes_json(event: &EntityEvent) -> Json {
    match event.changes() {
        None => Json::Null,
        Some(changes) => Json::Object(
            changes
                .iter()
                .map(|c| (c.field.to_string(), json!({"old": c.old, "new": c.new})))
                .collect::<Map<_, _>>(),
        ),
    }
}

/// Slack's escaping of message text: `&` -> `&amp;`, `<` -> `&lt;`, `>` -> `&gt;` (the three
/// characters Slack's formatting reads as control characters).
pub fn escape_slack(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` with the Redis glob metacharacters `* ? [ ] \` backslash-escaped: as a `SCAN MATCH`
/// pattern it matches exactly `text`.
pub fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A compile error with its position: "line 1: syntax error: unexpected `}` (near `{{ a }`)".
fn describe(e: &minijinja::Error, source: &str) -> String {
    let mut msg = match e.line() {
        Some(line) => format!("line {line}: {}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    if let Some(range) = e.range() {
        if let Some(near) = source.get(range.clone()) {
            msg.push_str(&format!(" (at `{near}`, byte {})", range.start));
        }
    }
    msg
}

fn describe_render(e: &minijinja::Error) -> String {
    let mut msg = e.kind().to_string();
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (line {line})"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, Position};
    use chrono::TimeZone;
    use uuid::Uuid;

    fn event(kind: EventKind, before: Option<Json>, after: Option<Json>) -> EntityEvent {
        EntityEvent {
            id: Uuid::from_u128(1),
            sequence: 42,
            kind,
            entity_type: "Order".into(),
            entity_id: Uuid::from_u128(2),
            tenant: Some(Uuid::from_u128(3)),
            author: Some("alice".into()),
            before: before.map(Into::into),
            after: after.map(Into::into),
            change_status: "new".into(),
            extra_metadata: json!({"source": "api"}),
            source: None,
            created_at: chrono::Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap(),
            source_ts: None,
            position: Position {
                batch: 1,
                sequence: 42,
            },
        }
    }

    fn created() -> EntityEvent {
        event(
            EventKind::Created,
            None,
            Some(json!({"email": "a\"b\\c</script>", "total": 10})),
        )
    }

    /// The context built straight from the event is the one built through `context_json`.
    #[test]
    fn event_context_is_context_json() {
        let updated = event(
            EventKind::Updated,
            Some(
                json!({"status": "new", "total": 1.5, "tags": ["a"], "addr": {"z": 1, "a": null}}),
            ),
            Some(json!({"status": "paid", "total": 2, "tags": [], "extra": "x"})),
        );
        let deleted = EntityEvent {
            tenant: None,
            author: None,
            source: Some(json!({"table": "tb_order", "ts_us": 5})),
            source_ts: Some(chrono::Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 1).unwrap()),
            ..event(EventKind::Deleted, Some(json!({"id": 7})), None)
        };
        for e in [created(), updated, deleted] {
            assert_eq!(
                EventContext::new(&e).value,
                Value::from_serialize(context_json(&e))
            );
            let text = Template::compile(
                "{{ event }} {{ before }} {{ after }} {{ data }} {{ changes }}",
                TemplateMode::Text,
            )
            .unwrap();
            assert_eq!(
                text.render(&e).unwrap(),
                text.render_context(&EventContext {
                    value: Value::from_serialize(context_json(&e))
                })
                .unwrap()
            );
        }
    }

    #[test]
    fn text_mode_renders_event_fields_and_row_fields() {
        let t = Template::compile(
            "{{ event.entity_type }} {{ event.entity_id }} {{ event.kind }}/{{ event.op }} total={{ after.total }} at {{ event.created_at }}",
            TemplateMode::Text,
        )
        .unwrap();
        assert_eq!(
            t.render(&created()).unwrap(),
            "Order 00000000-0000-0000-0000-000000000002 INSERT/c total=10 at 2024-05-01T12:00:00Z"
        );
    }

    #[test]
    fn json_mode_escapes_strings_by_construction() {
        let t = Template::compile(
            r#"{"email": {{ after.email }}, "n": {{ after.total }}, "tenant": {{ event.tenant }}}"#,
            TemplateMode::Json,
        )
        .unwrap();
        let out: Json = serde_json::from_str(&t.render(&created()).unwrap()).unwrap();
        assert_eq!(out["email"], "a\"b\\c</script>");
        assert_eq!(out["n"], 10);
        assert_eq!(out["tenant"], "00000000-0000-0000-0000-000000000003");
    }

    #[test]
    fn json_mode_emits_maps_as_objects() {
        let t = Template::compile(
            r#"{"row": {{ data }}, "c": {{ changes }}}"#,
            TemplateMode::Json,
        )
        .unwrap();
        let out: Json = serde_json::from_str(&t.render(&created()).unwrap()).unwrap();
        assert_eq!(out["row"]["total"], 10);
        // A create's changes: every field as new (as the parser decodes it).
        assert_eq!(out["c"]["total"], json!({"new": 10, "old": null}));
    }

    #[test]
    fn json_mode_quoting_a_value_is_a_render_error_not_a_broken_body() {
        let t = Template::compile(r#"{"email": "{{ after.email }}"}"#, TemplateMode::Json).unwrap();
        let err = t.render(&created()).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn json_mode_has_no_safe_filter() {
        let err = Template::compile(r#"{"e": {{ after.email | safe }}}"#, TemplateMode::Json)
            .map(|t| t.render(&created()))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("safe"), "{err}");
    }

    #[test]
    fn absent_images_and_fields_render_as_null_or_nothing() {
        let json = Template::compile(
            r#"{"old": {{ before.email }}, "missing": {{ after.nope.deeper }}}"#,
            TemplateMode::Json,
        )
        .unwrap();
        let out: Json = serde_json::from_str(&json.render(&created()).unwrap()).unwrap();
        assert_eq!(out, json!({"old": null, "missing": null}));

        let text = Template::compile("[{{ before.email }}]", TemplateMode::Text).unwrap();
        assert_eq!(text.render(&created()).unwrap(), "[]");
    }

    #[test]
    fn changes_map_old_and_new() {
        let e = event(
            EventKind::Updated,
            Some(json!({"status": "new", "total": 1})),
            Some(json!({"status": "paid", "total": 1})),
        );
        let t = Template::compile(
            "{% for f, c in changes | items %}{{ f }}:{{ c.old }}->{{ c.new }};{% endfor %}{{ data.status }}",
            TemplateMode::Text,
        )
        .unwrap();
        assert_eq!(t.render(&e).unwrap(), "status:new->paid;paid");
    }

    #[test]
    fn data_is_the_before_image_of_a_delete() {
        let e = event(EventKind::Deleted, Some(json!({"email": "x@y"})), None);
        let t = Template::compile("{{ data.email }} {{ event.kind }}", TemplateMode::Text).unwrap();
        assert_eq!(t.render(&e).unwrap(), "x@y DELETE");
    }

    #[test]
    fn html_mode_escapes_printed_values() {
        let t = Template::compile("<p>{{ after.email }}</p>", TemplateMode::Html).unwrap();
        assert_eq!(
            t.render(&created()).unwrap(),
            "<p>a&quot;b\\c&lt;&#x2f;script&gt;</p>"
        );
    }

    #[test]
    fn glob_mode_escapes_printed_values_but_not_the_template_text() {
        let e = event(
            EventKind::Created,
            None,
            Some(json!({"name": "a*b?[c]\\d", "id": 7})),
        );
        let t = Template::compile(
            "user:{{ after.id }}:{{ after.name }}:{{ '*' }}:{{ after.missing | default('') }}:*",
            TemplateMode::Glob,
        )
        .unwrap();
        assert_eq!(t.render(&e).unwrap(), r"user:7:a\*b\?\[c\]\\d:\*::*");
        assert_eq!(escape_glob("plain:key"), "plain:key");
    }

    #[test]
    fn key_modes_refuse_absent_values() {
        let deleted = event(EventKind::Deleted, Some(json!({"id": 7})), None);
        for mode in [TemplateMode::Key, TemplateMode::Glob] {
            let t = Template::compile("order:{{ after.id }}", mode).unwrap();
            let err = t.render(&deleted).unwrap_err();
            assert!(err.to_string().contains("absent"), "{err}");
            let t = Template::compile("order:{{ data.id }}:{{ before.none }}", mode).unwrap();
            assert!(t.render(&deleted).is_err());
            let t = Template::compile("order:{{ data.id }}", mode).unwrap();
            assert_eq!(t.render(&deleted).unwrap(), "order:7");
        }
        let t = Template::compile("k:{{ after.name }}", TemplateMode::Key).unwrap();
        let e = event(EventKind::Created, None, Some(json!({"name": "a*b"})));
        assert_eq!(t.render(&e).unwrap(), "k:a*b");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = Template::compile("ok\n{{ event.id }", TemplateMode::Text).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)));
        assert!(err.to_string().starts_with("line 2: syntax error"), "{err}");
    }

    #[test]
    fn unknown_variable_is_a_compile_error() {
        let err = Template::compile("{{ evnt.id }} {{ event.entity }}", TemplateMode::Text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'evnt'"), "{err}");
        assert!(err.contains("'event.entity'"), "{err}");
    }

    #[test]
    fn loop_variables_and_globals_are_not_unknown() {
        let t = Template::compile(
            "{% set n = 2 %}{% for i in range(n) %}{{ i }}{% endfor %}{{ loop_free | default('x') if false else '' }}",
            TemplateMode::Text,
        );
        // `loop_free` is a typo-like unknown name even inside a branch that never runs.
        assert!(t.is_err());
        let t = Template::compile(
            "{% set n = 2 %}{% for i in range(n) %}{{ i }}{% endfor %}",
            TemplateMode::Text,
        )
        .unwrap();
        assert_eq!(t.render(&created()).unwrap(), "01");
    }
}
