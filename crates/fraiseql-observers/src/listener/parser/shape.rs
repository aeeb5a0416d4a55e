//! Which layout `core.tb_entity_change_log` has: the two known shapes, the catalog query that
//! discovers them, the column types the decoder can read, and the select list. Pure.

use crate::error::{Error, Result};

/// The fully qualified name of the change log, as the catalog query and the messages name it.
const TABLE: &str = "core.tb_entity_change_log";

/// Which of the two known layouts of `core.tb_entity_change_log` a database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// The mission's layout (FraiseQL schema-conventions 6.1): `id BIGINT` is the sequence,
    /// `pk_entity_change_log UUID` the change id, `fk_customer_org UUID` the tenant,
    /// `fk_contact UUID` the author, and `object_data` holds a Debezium envelope
    /// `{before, after, op, source}`.
    Envelope,
    /// The later FraiseQL layout: `pk_entity_change_log BIGINT` is the sequence, `id UUID` the
    /// change id, `tenant_id UUID` the tenant, `fk_contact BIGINT` the author; `object_data` is the
    /// after-image, `object_data_before` the pre-image, `modification_type` the operation and
    /// `commit_time` the source timestamp.
    Split,
}

impl ShapeKind {
    fn name(self) -> &'static str {
        match self {
            ShapeKind::Envelope => "envelope",
            ShapeKind::Split => "split",
        }
    }
}

/// Which column types a column may have for the decoder to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeClass {
    /// Read with its own type: must be `bigint`.
    Bigint,
    /// Read as text and parsed as a UUID per row: `uuid` or a text type.
    UuidLike,
    /// Read as text and parsed as JSON per row: `jsonb`, `json` or a text type.
    JsonLike,
    /// Read as text, any type (`text`, an enum, a number for `fk_contact`...).
    AnyText,
    /// Read with its own type: must be `timestamp with time zone` (a `timestamp` without a time
    /// zone is refused rather than read in a guessed zone).
    Timestamptz,
}

impl TypeClass {
    fn accepts(self, data_type: &str) -> bool {
        const TEXT: [&str; 3] = ["text", "character varying", "character"];
        match self {
            TypeClass::Bigint => data_type == "bigint",
            TypeClass::UuidLike => data_type == "uuid" || TEXT.contains(&data_type),
            TypeClass::JsonLike => {
                data_type == "jsonb" || data_type == "json" || TEXT.contains(&data_type)
            }
            TypeClass::AnyText => true,
            TypeClass::Timestamptz => data_type == "timestamp with time zone",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            TypeClass::Bigint => "bigint",
            TypeClass::UuidLike => "uuid or text",
            TypeClass::JsonLike => "jsonb, json or text",
            TypeClass::AnyText => "any type",
            TypeClass::Timestamptz => "timestamp with time zone",
        }
    }
}

/// One column the decoder reads, in one shape.
#[derive(Debug, Clone, Copy)]
struct ColumnSpec {
    name: &'static str,
    class: TypeClass,
    required: bool,
}

const fn required(name: &'static str, class: TypeClass) -> Option<ColumnSpec> {
    Some(ColumnSpec {
        name,
        class,
        required: true,
    })
}

const fn optional(name: &'static str, class: TypeClass) -> Option<ColumnSpec> {
    Some(ColumnSpec {
        name,
        class,
        required: false,
    })
}

/// The number of columns in [`TableShape::select_list`].
pub(super) const SLOT_COUNT: usize = 13;

/// The select list's columns, in order: the alias each gets, and whether a missing column is
/// `NULL::timestamptz` (true) or `NULL::text` (false). Slot 0 (the sequence) is always present.
pub(super) const SLOTS: [(&str, bool); SLOT_COUNT] = [
    ("sequence", false),
    ("change_id", false),
    ("tenant", false),
    ("author", false),
    ("object_type", false),
    ("object_id", false),
    ("modification_type", false),
    ("change_status", false),
    ("object_data", false),
    ("object_data_before", false),
    ("extra_metadata", false),
    ("created_at", true),
    ("commit_time", true),
];

/// Where each slot comes from in the envelope shape (`None`: not part of this shape, NULL).
const ENVELOPE_COLUMNS: [Option<ColumnSpec>; SLOT_COUNT] = [
    required("id", TypeClass::Bigint),
    required("pk_entity_change_log", TypeClass::UuidLike),
    optional("fk_customer_org", TypeClass::UuidLike),
    optional("fk_contact", TypeClass::AnyText),
    required("object_type", TypeClass::AnyText),
    required("object_id", TypeClass::UuidLike),
    optional("modification_type", TypeClass::AnyText),
    optional("change_status", TypeClass::AnyText),
    required("object_data", TypeClass::JsonLike),
    None,
    optional("extra_metadata", TypeClass::JsonLike),
    optional("created_at", TypeClass::Timestamptz),
    None,
];

/// Where each slot comes from in the split shape.
const SPLIT_COLUMNS: [Option<ColumnSpec>; SLOT_COUNT] = [
    required("pk_entity_change_log", TypeClass::Bigint),
    required("id", TypeClass::UuidLike),
    optional("tenant_id", TypeClass::UuidLike),
    optional("fk_contact", TypeClass::AnyText),
    required("object_type", TypeClass::AnyText),
    required("object_id", TypeClass::UuidLike),
    required("modification_type", TypeClass::AnyText),
    optional("change_status", TypeClass::AnyText),
    required("object_data", TypeClass::JsonLike),
    optional("object_data_before", TypeClass::JsonLike),
    optional("extra_metadata", TypeClass::JsonLike),
    optional("created_at", TypeClass::Timestamptz),
    optional("commit_time", TypeClass::Timestamptz),
];

fn columns_of(kind: ShapeKind) -> &'static [Option<ColumnSpec>; SLOT_COUNT] {
    match kind {
        ShapeKind::Envelope => &ENVELOPE_COLUMNS,
        ShapeKind::Split => &SPLIT_COLUMNS,
    }
}

/// The change log's layout as discovered from the catalog: its [`ShapeKind`] and which optional
/// columns exist. Built once at start-up by [`TableShape::from_columns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    kind: ShapeKind,
    /// Per select-list slot: whether the table has the column (else the slot selects NULL).
    present: [bool; SLOT_COUNT],
}

impl TableShape {
    /// SQL listing the change log's columns as rows `(column_name text, data_type text)`, in
    /// column order. `data_type` is the base type's SQL name without modifiers (`bigint`, `uuid`,
    /// `jsonb`, `character varying`, `timestamp with time zone`; a domain reports its base type).
    /// When the table does not exist the query returns no rows (it uses `to_regclass`, so it does
    /// not fail), and [`TableShape::from_columns`] says so.
    pub const CATALOG_QUERY: &'static str = "\
SELECT a.attname::text AS column_name, \
       format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, NULL) AS data_type \
  FROM pg_attribute a \
  JOIN pg_type t ON t.oid = a.atttypid \
 WHERE a.attrelid = to_regclass('core.tb_entity_change_log') \
   AND a.attnum > 0 \
   AND NOT a.attisdropped \
 ORDER BY a.attnum";

    /// The columns of the mission's table shape (`0001_change_log.sql`: a BIGINT `id`, a UUID
    /// `pk_entity_change_log`, the Debezium envelope in `object_data`), as the catalog lists them.
    pub const MISSION_COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("id", "bigint"),
        ("pk_entity_change_log", "uuid"),
        ("fk_customer_org", "uuid"),
        ("fk_contact", "uuid"),
        ("object_type", "text"),
        ("object_id", "uuid"),
        ("modification_type", "text"),
        ("change_status", "text"),
        ("object_data", "jsonb"),
        ("extra_metadata", "jsonb"),
        ("created_at", "timestamp with time zone"),
        ("txid", "xid8"),
    ];

    /// The mission's table shape ([`TableShape::MISSION_COLUMNS`]), without asking a database.
    pub fn mission() -> TableShape {
        let columns: Vec<(String, String)> = Self::MISSION_COLUMNS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        TableShape::from_columns(&columns).expect("the mission's own shape")
    }

    /// Decide the shape from the rows of [`TableShape::CATALOG_QUERY`].
    ///
    /// The envelope shape needs a BIGINT `id`, a UUID-or-text `pk_entity_change_log`, and
    /// `object_type`, `object_id` (UUID or text), `object_data` (JSONB, JSON or text); the split
    /// shape needs a BIGINT `pk_entity_change_log`, a UUID-or-text `id`, the same three, and
    /// `modification_type`. Every other column is optional and selected as NULL when missing, but
    /// a column that exists must have a type the decoder can read. When neither shape fits, the
    /// [`Error::ChangeLogShape`] names every missing column and every column of the wrong type
    /// (for the shape whose sequence column is there, or for both when neither is).
    pub fn from_columns(columns: &[(String, String)]) -> Result<TableShape> {
        if columns.is_empty() {
            return Err(Error::ChangeLogShape(format!(
                "{TABLE} does not exist; create it with `fraiseql-observers migrate`"
            )));
        }
        let envelope = Self::check(ShapeKind::Envelope, columns);
        let split = Self::check(ShapeKind::Split, columns);
        let (envelope_problems, split_problems) = match (envelope, split) {
            (Ok(shape), _) | (_, Ok(shape)) => return Ok(shape),
            (Err(e), Err(s)) => (e, s),
        };
        let has_bigint = |name: &str| {
            columns
                .iter()
                .any(|(n, t)| n == name && TypeClass::Bigint.accepts(t))
        };
        let describe = |kind: ShapeKind, problems: &[String]| {
            let sequence = columns_of(kind)[0].map_or("", |c| c.name);
            format!(
                "as the {} shape (sequence column BIGINT {sequence}): {}",
                kind.name(),
                problems.join("; ")
            )
        };
        let message = match (has_bigint("id"), has_bigint("pk_entity_change_log")) {
            (true, false) => format!(
                "{TABLE} does not fit {}",
                describe(ShapeKind::Envelope, &envelope_problems)
            ),
            (false, true) => format!(
                "{TABLE} does not fit {}",
                describe(ShapeKind::Split, &split_problems)
            ),
            _ => format!(
                "{TABLE} fits neither known shape; {}; {}",
                describe(ShapeKind::Envelope, &envelope_problems),
                describe(ShapeKind::Split, &split_problems)
            ),
        };
        Err(Error::ChangeLogShape(message))
    }

    /// The shape `kind` if `columns` fit it, else every problem found.
    fn check(kind: ShapeKind, columns: &[(String, String)]) -> Result<TableShape, Vec<String>> {
        let mut problems = Vec::new();
        let mut present = [false; SLOT_COUNT];
        for (slot, spec) in columns_of(kind).iter().enumerate() {
            let Some(spec) = spec else { continue };
            match columns.iter().find(|(name, _)| name == spec.name) {
                None if spec.required => problems.push(format!("missing column {}", spec.name)),
                None => {}
                Some((_, data_type)) if !spec.class.accepts(data_type) => problems.push(format!(
                    "column {} is {data_type}, expected {}",
                    spec.name,
                    spec.class.expected()
                )),
                Some(_) => present[slot] = true,
            }
        }
        if problems.is_empty() {
            Ok(TableShape { kind, present })
        } else {
            Err(problems)
        }
    }

    /// Which layout the table has.
    pub fn kind(&self) -> ShapeKind {
        self.kind
    }

    /// The BIGINT column holding the monotonic number: `"id"` (envelope shape) or
    /// `"pk_entity_change_log"` (split shape).
    pub fn sequence_column(&self) -> &'static str {
        match self.kind {
            ShapeKind::Envelope => "id",
            ShapeKind::Split => "pk_entity_change_log",
        }
    }

    /// The column holding the change's own UUID (the event id): `"pk_entity_change_log"`
    /// (envelope shape) or `"id"` (split shape).
    pub fn change_id_column(&self) -> &'static str {
        match self.kind {
            ShapeKind::Envelope => "pk_entity_change_log",
            ShapeKind::Split => "id",
        }
    }

    /// The SELECT list for the change log aliased `l`, in the order [`ChangeLogRow::from_row`]
    /// reads it: the sequence (bigint), then as text the change id, tenant, author, object_type,
    /// object_id, modification_type, change_status, object_data, object_data_before,
    /// extra_metadata, then created_at and the source commit time (timestamptz). A column the
    /// table lacks (or that its shape does not have) is `NULL::text` / `NULL::timestamptz`.
    /// No trailing comma: the caller may append its own columns after a comma.
    pub fn select_list(&self) -> String {
        let columns = columns_of(self.kind);
        let mut list = String::with_capacity(512);
        for (slot, (alias, timestamp)) in SLOTS.iter().enumerate() {
            if slot > 0 {
                list.push_str(", ");
            }
            let expression = match columns[slot] {
                Some(spec) if self.present[slot] => match spec.class {
                    TypeClass::Bigint | TypeClass::Timestamptz => format!("l.{}", spec.name),
                    _ => format!("l.{}::text", spec.name),
                },
                _ if *timestamp => "NULL::timestamptz".to_string(),
                _ => "NULL::text".to_string(),
            };
            list.push_str(&expression);
            list.push_str(" AS ");
            list.push_str(alias);
        }
        list
    }
}
