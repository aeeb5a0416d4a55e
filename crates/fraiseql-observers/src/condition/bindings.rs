//! How an event is exposed to a CEL expression: names resolve lazily, converting only what they
//! name (strings borrowed from the event). Pure.

use std::collections::HashMap;
use std::sync::OnceLock;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::ExecutionError;
use serde_json::Value;

use super::functions::RUNTIME;
use super::limits::MAX_DATA_DEPTH;
use crate::event::{EntityEvent, FieldChangeRef};

/// Names only the functions look up: `#` cannot start a CEL identifier, so an expression can
/// neither read nor shadow them.
pub(super) const DATA_FIELDS: &str = "#data";
pub(super) const CHANGES: &str = "#changes";

/// The names that are not data fields.
const RESERVED: [&str; 5] = ["before", "after", "data", "event", "changes"];

/// The entries of the `event` map.
const EVENT_FIELDS: [&str; 11] = [
    "id",
    "sequence",
    "kind",
    "op",
    "entity_type",
    "entity_id",
    "tenant",
    "author",
    "change_status",
    "extra_metadata",
    "source",
];

/// What one evaluation sees of one event. A whole reserved map is converted on first use and
/// kept; a bare field or a dotted path converts only its value, on each lookup (usually a
/// scalar; strings are borrowed).
pub(super) struct Bindings<'a> {
    event: &'a EntityEvent,
    data: &'a Value,
    before: OnceLock<Box<dyn Val + 'a>>,
    after: OnceLock<Box<dyn Val + 'a>>,
    data_map: OnceLock<Box<dyn Val + 'a>>,
    event_map: OnceLock<Box<dyn Val + 'a>>,
    changes: OnceLock<Box<dyn Val + 'a>>,
    data_fields: DataFields<'a>,
    /// Set to the variable whose data was too deep to convert (converted as `null`).
    pub(super) too_deep: OnceLock<&'static str>,
}

impl<'a> Bindings<'a> {
    pub(super) fn new(event: &'a EntityEvent) -> Bindings<'a> {
        let data = event.data();
        Bindings {
            event,
            data,
            before: OnceLock::new(),
            after: OnceLock::new(),
            data_map: OnceLock::new(),
            event_map: OnceLock::new(),
            changes: OnceLock::new(),
            data_fields: DataFields(data),
            too_deep: OnceLock::new(),
        }
    }

    /// Converts `value`, found `depth` levels below the root of `variable`'s data.
    fn convert(&self, value: &'a Value, depth: usize, variable: &'static str) -> Box<dyn Val + 'a> {
        json_to_val(value, depth, &|| {
            let _ = self.too_deep.set(variable);
        })
    }

    fn convert_optional(
        &self,
        value: Option<&'a Value>,
        depth: usize,
        variable: &'static str,
    ) -> Box<dyn Val + 'a> {
        match value {
            Some(v) => self.convert(v, depth, variable),
            None => Box::new(CelNull),
        }
    }

    /// One entry of the `event` map.
    fn event_field(&self, name: &str) -> Option<Box<dyn Val + 'a>> {
        fn string_or_null<'v>(s: Option<String>) -> Box<dyn Val + 'v> {
            match s {
                Some(s) => Box::new(CelString::from(s)),
                None => Box::new(CelNull),
            }
        }
        let e = self.event;
        Some(match name {
            "id" => Box::new(CelString::from(e.id.to_string())),
            "sequence" => Box::new(CelInt::from(e.sequence)),
            "kind" => Box::new(CelString::from(e.kind.as_str())),
            "op" => Box::new(CelString::from(e.kind.op())),
            "entity_type" => Box::new(CelString::from(e.entity_type.as_str())),
            "entity_id" => Box::new(CelString::from(e.entity_id.to_string())),
            "tenant" => string_or_null(e.tenant.map(|t| t.to_string())),
            "author" => match &e.author {
                Some(a) => Box::new(CelString::from(a.as_str())),
                None => Box::new(CelNull),
            },
            "change_status" => Box::new(CelString::from(e.change_status.as_str())),
            "extra_metadata" => self.convert(&e.extra_metadata, 0, "event.extra_metadata"),
            "source" => self.convert_optional(e.source.as_ref(), 0, "event.source"),
            _ => return None,
        })
    }

    fn event_map(&self) -> Box<dyn Val + 'a> {
        let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = EVENT_FIELDS
            .iter()
            .filter_map(|&name| Some((CelMapKey::from(name), self.event_field(name)?)))
            .collect();
        Box::new(CelMap::from(map))
    }

    /// `a.b.c` as a whole, converting only the value it names. CEL asks for the longest
    /// qualified name first; answering it spares converting `a` whole. Anything short of a
    /// plain walk through objects (a missing key, a list, an absent image) is left to CEL's own
    /// selection (`None`), so the answer and the errors are the same as selecting step by step.
    fn resolve_path(&self, name: &str) -> Option<Box<dyn Val + 'a>> {
        let mut segments = name.split('.');
        let head = segments.next()?;
        let e = self.event;
        let (mut value, variable): (&'a Value, &'static str) = match head {
            "before" => (e.before.as_deref()?, "before"),
            "after" => (e.after.as_deref()?, "after"),
            "data" => (self.data, "data"),
            "event" => match segments.next()? {
                "extra_metadata" => (&e.extra_metadata, "event.extra_metadata"),
                "source" => (e.source.as_ref()?, "event.source"),
                field => {
                    return match segments.next() {
                        None => self.event_field(field),
                        Some(_) => None,
                    };
                }
            },
            "changes" => {
                let field = segments.next()?;
                let change = e.field_change(field).ok()??;
                let side = match segments.next()? {
                    "old" => change.old,
                    "new" => change.new,
                    _ => return None,
                };
                match side {
                    Some(side) => (side, "changes"),
                    None if segments.next().is_none() => return Some(Box::new(CelNull)),
                    None => return None,
                }
            }
            field => (self.data.get(field)?, "a bare field"),
        };
        let mut depth = if head == "changes" || !RESERVED.contains(&head) {
            1
        } else {
            0
        };
        for segment in segments {
            value = value.as_object()?.get(segment)?;
            depth += 1;
        }
        Some(self.convert(value, depth, variable))
    }

    /// `changes`: the event's changes ([`EntityEvent::changes`]: for a create every field as new,
    /// for a delete every field as removed); unknown (`null`) without the images to compare.
    fn changes_map(&self) -> Box<dyn Val + 'a> {
        let e = self.event;
        let change = |field: &'a str, old: Option<&'a Value>, new: Option<&'a Value>| {
            let sides: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = [
                (
                    CelMapKey::from("old"),
                    self.convert_optional(old, 1, "changes"),
                ),
                (
                    CelMapKey::from("new"),
                    self.convert_optional(new, 1, "changes"),
                ),
            ]
            .into_iter()
            .collect();
            (
                CelMapKey::from(field),
                Box::new(CelMap::from(sides)) as Box<dyn Val + 'a>,
            )
        };
        let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = match e.changes() {
            Some(changes) => changes
                .iter()
                .map(|FieldChangeRef { field, old, new }| change(field, *old, *new))
                .collect(),
            None => return Box::new(CelNull),
        };
        Box::new(CelMap::from(map))
    }
}

/// Names CEL resolves to types when no variable has them (`type(x) == int`); a missing data
/// field with one of these names is left to CEL rather than bound to `null`.
fn is_type_name(name: &str) -> bool {
    RUNTIME.env.types().find_type(name).is_some()
}

impl<'a> Bindings<'a> {
    /// The value in `cell`, converted by `init` on first use.
    fn cached<'b>(
        cell: &'b OnceLock<Box<dyn Val + 'a>>,
        init: impl FnOnce() -> Box<dyn Val + 'a>,
    ) -> Option<CowVal<'b, 'b>> {
        let value: &'b (dyn Val + 'a) = cell.get_or_init(init).as_ref();
        Some(CowVal::Borrowed(value))
    }
}

impl<'a> VariableResolver for Bindings<'a> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let event = self.event;
        match name {
            "before" => Self::cached(&self.before, || {
                self.convert_optional(event.before.as_deref(), 0, "before")
            }),
            "after" => Self::cached(&self.after, || {
                self.convert_optional(event.after.as_deref(), 0, "after")
            }),
            "data" => Self::cached(&self.data_map, || self.convert(self.data, 0, "data")),
            "event" => Self::cached(&self.event_map, || self.event_map()),
            "changes" | CHANGES => Self::cached(&self.changes, || self.changes_map()),
            DATA_FIELDS => Some(CowVal::Borrowed(&self.data_fields)),
            _ if name.contains('.') => self.resolve_path(name).map(CowVal::Owned),
            _ => match self.data.get(name) {
                Some(value) => Some(CowVal::Owned(self.convert(value, 1, "a bare field"))),
                None if is_type_name(name) => None,
                None => Some(CowVal::owned(CelNull)),
            },
        }
    }
}

/// The top-level field names of the current state, for `has_field` without converting values.
#[derive(Debug, Clone, Copy)]
struct DataFields<'a>(&'a Value);

impl Val for DataFields<'_> {
    fn get_type(&self) -> &cel::common::types::Type {
        &cel::common::types::DYN_TYPE
    }

    fn cel_type() -> &'static cel::common::types::Type {
        &cel::common::types::DYN_TYPE
    }

    fn as_container(&self) -> Option<&dyn cel::common::traits::Container> {
        Some(self)
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(*self)
    }
}

impl cel::common::traits::Container for DataFields<'_> {
    fn contains(&self, key: &dyn Val) -> Result<bool, ExecutionError> {
        Ok(key
            .downcast_ref::<CelString>()
            .is_some_and(|k| self.0.get(k.inner()).is_some()))
    }
}

/// Converts JSON to CEL values, borrowing strings and keys. An integer is an `int` (a `uint`
/// above `i64::MAX`), any other number a `double`. Containers nested deeper than
/// [`MAX_DATA_DEPTH`] become `null` after calling `too_deep`.
fn json_to_val<'a>(value: &'a Value, depth: usize, too_deep: &dyn Fn()) -> Box<dyn Val + 'a> {
    match value {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Array(_) | Value::Object(_) if depth >= MAX_DATA_DEPTH => {
            too_deep();
            Box::new(CelNull)
        }
        Value::Array(items) => {
            let items: Vec<Box<dyn Val + 'a>> = items
                .iter()
                .map(|item| json_to_val(item, depth + 1, too_deep))
                .collect();
            Box::new(CelList::from(items))
        }
        Value::Object(fields) => {
            let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = fields
                .iter()
                .map(|(k, v)| {
                    (
                        CelMapKey::from(k.as_str()),
                        json_to_val(v, depth + 1, too_deep),
                    )
                })
                .collect();
            Box::new(CelMap::from(map))
        }
    }
}
