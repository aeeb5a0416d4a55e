//! Observer conditions: a CEL expression, compiled once when the configuration loads and evaluated
//! against each [`EntityEvent`] an observer matches. Pure: no I/O, no logging, no global mutable
//! state.
//!
//! Invariants:
//! * [`Condition::compile`] rejects everything it can know is wrong before any event arrives: a
//!   source over [`MAX_SOURCE_LEN`] bytes, nesting deeper than [`MAX_SOURCE_NESTING`], a syntax
//!   error (with its line and column), a call to a function that does not exist.
//! * [`Condition::evaluate`] answers `Ok(true)`/`Ok(false)` only when the event decides it. A
//!   question the event cannot answer is an error, never a silent `false`: "did `f` change" on
//!   an update logged without a before-image is [`ConditionError::NoBeforeImage`]; a result that
//!   is not a bool is [`ConditionError::NotBoolean`]; data nested deeper than [`MAX_DATA_DEPTH`]
//!   is [`ConditionError::DataTooDeep`].
//! * Only what the expression reads is converted: a bare field or a dotted path
//!   (`after.address.city`, `event.kind`) converts just the value it names, when it is looked up;
//!   a whole `before`/`after`/`data`/`event`/`changes` map is converted at most once per
//!   evaluation; strings are borrowed from the event, not copied.
//! * The expression tree is at most [`MAX_SOURCE_NESTING`] deep, so evaluating it (which
//!   recurses on the caller's stack) fits a 2 MiB thread stack, even in a debug build.
//!
//! # The language
//!
//! A condition is a [CEL](https://cel.dev) expression that must evaluate to a bool.
//!
//! Variables:
//! * a bare identifier is a top-level field of the entity's current state ([`EntityEvent::data`]:
//!   the after-image, the before-image for a delete): `status == 'shipped'`. A field that is absent
//!   is `null`, so `status == 'x'` is false and `status == null` is true.
//! * `before`, `after`, `data`: the images as maps (`null` when absent); `after.address.city`. A
//!   key missing from a map is an error in CEL: test it with `has(after.address)`.
//! * `event`: `id`, `sequence`, `kind` (`INSERT`/`UPDATE`/`DELETE`/`CUSTOM`), `op`
//!   (`c`/`u`/`d`/`r`), `entity_type`, `entity_id`, `tenant` (string or null), `author` (string or
//!   null), `change_status`, `extra_metadata`, `source` (map or null).
//! * `changes`: map of changed top-level field to `{'old': v, 'new': v}` (`null` stands for
//!   absent), or `null` when unknown (an update without a before-image).
//!
//! These five names are reserved: a data field called `before` is reached as `data.before`.
//!
//! Functions, besides CEL's standard library (`in`, `size`, `contains`, `startsWith`,
//! `endsWith`, `matches`, `has()`, `int()`, `double()`, `string()`, `all`/`exists`, `? :`):
//! `has_field('f')`, `field_changed('f')`, `field_changed_to('f', v)`,
//! `field_changed_from('f', v)`, `lower(s)`, `upper(s)` (also `s.lower()`, `s.upper()`).
//! On a create every present field changed (from absent); on a delete every field changed (to
//! absent); absent compares as `null`.
//!
//! Numbers: a JSON integer is an `int`, any other JSON number a `double`; `==`, `<`, `in` compare
//! numbers by value across the two (`100 == 100.0`, `100.00 > 99`), strings never equal numbers
//! (`'100' == 100` is false; write `double('100') == 100.0`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};

use cel::common::ast::Expr;
use cel::common::functions::Function;
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
    STRING_TYPE,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, ExecutionError, FunctionContext, Program, Value as CelValue};
use serde_json::Value;

use crate::event::{EntityEvent, EventKind, FieldChange};

/// The longest source accepted, in bytes.
pub const MAX_SOURCE_LEN: usize = 4096;
/// The deepest nesting accepted: of parentheses, brackets and braces in the source, and of the
/// expression tree it parses to (`1 + 1 + 1` is 3 deep), which evaluation recurses through on
/// the caller's stack. 32 levels fit a 2 MiB thread stack even in a debug build.
pub const MAX_SOURCE_NESTING: usize = 32;
/// The deepest nesting of objects and arrays converted from an event's data.
pub const MAX_DATA_DEPTH: usize = 64;
/// The stack of the thread [`Condition::compile`] parses on. Parsing the worst source within
/// the bounds needs less than 8 MiB in a debug build.
const COMPILE_STACK_SIZE: usize = 16 << 20;

/// Why a condition did not compile, or could not be evaluated against an event.
#[derive(Debug, thiserror::Error)]
pub enum ConditionError {
    #[error("condition syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },

    #[error("condition is {len} bytes long, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },

    #[error("condition nests {depth} levels deep, more than the {max} allowed")]
    TooDeep { depth: usize, max: usize },

    #[error("condition calls '{name}', which is not a known function")]
    UnknownFunction { name: String },

    #[error("could not start the thread that compiles conditions: {0}")]
    CompilerThread(#[source] std::io::Error),

    /// The message names types, keys and functions, never a value from the event, so it can be
    /// logged.
    #[error("condition could not be evaluated: {message}")]
    Evaluation { message: String },

    #[error("condition asks whether field '{field}' changed, but the event has no before-image to compare with (log updates with their before-image)")]
    NoBeforeImage { field: String },

    #[error("condition evaluated to a {found}, not a bool")]
    NotBoolean { found: String },

    #[error("event data is nested more than {max} levels deep (in '{variable}')")]
    DataTooDeep { variable: String, max: usize },
}

/// A compiled condition. Compile once, evaluate for every event; `Send + Sync`, so it can be
/// shared across tasks.
pub struct Condition {
    source: String,
    program: Program,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Condition {
    /// Parses and checks `source`. Errors name the line and column of a syntax error, and any
    /// function the expression calls that does not exist.
    pub fn compile(source: &str) -> Result<Condition, ConditionError> {
        if source.len() > MAX_SOURCE_LEN {
            return Err(ConditionError::TooLarge {
                len: source.len(),
                max: MAX_SOURCE_LEN,
            });
        }
        let depth = nesting_depth(source);
        if depth > MAX_SOURCE_NESTING {
            return Err(ConditionError::TooDeep {
                depth,
                max: MAX_SOURCE_NESTING,
            });
        }
        // The CEL parser recurses deeply (tens of KiB per level in a debug build): parse on a
        // thread of our own with a stack large enough for any source within the bounds above.
        let program = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("condition-compile".to_owned())
                .stack_size(COMPILE_STACK_SIZE)
                .spawn_scoped(scope, || parse(source))
                .map_err(ConditionError::CompilerThread)?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok(Condition {
            source: source.to_owned(),
            program,
        })
    }

    /// The source the condition was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `event` satisfies the condition. See the module documentation for what the
    /// expression sees and for the errors.
    pub fn evaluate(&self, event: &EntityEvent) -> Result<bool, ConditionError> {
        let bindings = Bindings::new(event);
        let root: &Context<'_, '_> = &RUNTIME.root;
        let mut scope = root.new_inner_scope();
        scope.set_variable_resolver(&bindings);
        let result = CelValue::resolve_val(self.program.expression(), &scope);
        if let Some(variable) = bindings.too_deep.get() {
            return Err(ConditionError::DataTooDeep {
                variable: (*variable).to_owned(),
                max: MAX_DATA_DEPTH,
            });
        }
        match result {
            Ok(value) => match value.downcast_ref::<CelBool>() {
                Some(b) => Ok(*b.inner()),
                None => Err(ConditionError::NotBoolean {
                    found: value.get_type().name().to_owned(),
                }),
            },
            Err(ExecutionError::FunctionError { function, message })
                if function == NO_BEFORE_IMAGE =>
            {
                Err(ConditionError::NoBeforeImage { field: message })
            }
            Err(error) => Err(ConditionError::Evaluation {
                message: describe(&error),
            }),
        }
    }
}

/// Parses and checks a source that is within the size and nesting bounds.
fn parse(source: &str) -> Result<Program, ConditionError> {
    let runtime = &*RUNTIME;
    let program = runtime.env.compile(source).map_err(|errors| {
        let first = errors.errors.first();
        ConditionError::Syntax {
            line: first.map_or(0, |e| usize::try_from(e.pos.0).unwrap_or(0)),
            column: first.map_or(0, |e| usize::try_from(e.pos.1).unwrap_or(0)),
            message: first.map_or_else(|| errors.to_string(), |e| e.msg.clone()),
        }
    })?;
    // Evaluation recurses once per level of the tree, on the caller's stack.
    let depth = expression_depth(program.expression());
    if depth > MAX_SOURCE_NESTING {
        return Err(ConditionError::TooDeep {
            depth,
            max: MAX_SOURCE_NESTING,
        });
    }
    check_functions(program.expression(), &runtime.env)?;
    Ok(program)
}

/// What went wrong, without the values CEL's own messages carry (they can be payload).
fn describe(error: &ExecutionError) -> String {
    use ExecutionError as E;
    let ty = |v: &CelValue| v.type_of().to_string();
    match error {
        E::InvalidArgumentCount { expected, actual } => {
            format!("expected {expected} argument(s), got {actual}")
        }
        E::UnsupportedTargetType { target } => format!("unsupported target of type {}", ty(target)),
        E::NotSupportedAsMethod { method, target } => {
            format!("'{method}' cannot be called on a {}", ty(target))
        }
        E::UnsupportedKeyType(key) => format!("a {} cannot be a map key", ty(key)),
        E::UnexpectedType { want, .. } => format!("unexpected type, expected {want}"),
        E::NoSuchKey(key) => format!("no such key '{key}' (test it with has())"),
        E::NoSuchOverload(overload) => overload.to_string(),
        E::UndeclaredReference(name) => format!("undeclared reference to '{name}'"),
        E::MissingArgumentOrTarget => "missing argument or target".to_owned(),
        E::ValuesNotComparable(a, b) => {
            format!("a {} cannot be compared to a {}", ty(a), ty(b))
        }
        E::UnsupportedBinaryOperator(op, a, b) => {
            format!("'{op}' does not apply to a {} and a {}", ty(a), ty(b))
        }
        E::UnsupportedIndex(index, target) => {
            format!("a {} cannot index a {}", ty(index), ty(target))
        }
        E::FunctionError { function, .. } => format!("'{function}' failed on its arguments"),
        E::DivisionByZero(_) => "division by zero".to_owned(),
        E::RemainderByZero(_) => "remainder by zero".to_owned(),
        E::Overflow(op, _, _) => format!("'{op}' overflowed"),
        E::IndexOutOfBounds(_) => "index out of bounds".to_owned(),
        E::DuplicateKey(_) => "repeated map key".to_owned(),
        _ => "the expression failed".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The runtime: CEL's standard library plus our functions, built once and shared (immutable).

/// A function added to the root context: it sees the evaluation's variables through `ptx`.
type ContextFunction = Box<
    dyn for<'c, 'k> Fn(&mut FunctionContext<'c, 'k>) -> Result<CowVal<'c, 'k>, ExecutionError>
        + Send
        + Sync,
>;

/// Names only the functions look up: `#` cannot start a CEL identifier, so an expression can
/// neither read nor shadow them.
const DATA_FIELDS: &str = "#data";
const CHANGES: &str = "#changes";
/// The function name an evaluation error carries when "did it change" has no answer; the
/// message is the field.
const NO_BEFORE_IMAGE: &str = "#no_before_image";

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

/// The functions this module adds, resolved through the root context.
const OUR_FUNCTIONS: [&str; 4] = [
    "has_field",
    "field_changed",
    "field_changed_to",
    "field_changed_from",
];

struct Runtime {
    env: Arc<Env>,
    root: Context<'static, 'static>,
}

static RUNTIME: LazyLock<Runtime> = LazyLock::new(Runtime::new);

impl Runtime {
    fn new() -> Runtime {
        let mut env = Env::stdlib();
        for (name, function) in [("lower", lower as Function), ("upper", upper)] {
            env.add_overload(name, &format!("{name}_string"), vec![STRING_TYPE], function)
                .and_then(|()| {
                    env.add_member_overload(
                        name,
                        &format!("string_{name}"),
                        STRING_TYPE,
                        vec![],
                        function,
                    )
                })
                .expect("'lower' and 'upper' are not standard CEL functions");
        }
        let env = Arc::new(env);
        let mut root = Context::with_env(Arc::clone(&env));
        let functions: [(&str, ContextFunction); 4] = [
            ("has_field", Box::new(has_field)),
            ("field_changed", Box::new(field_changed)),
            ("field_changed_to", Box::new(field_changed_to)),
            ("field_changed_from", Box::new(field_changed_from)),
        ];
        for (name, function) in functions {
            root.add_function(name, function)
                .expect("our function names are not standard CEL functions");
        }
        Runtime { env, root }
    }
}

fn lower<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    map_string("lower", &args, str::to_lowercase)
}

fn upper<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    map_string("upper", &args, str::to_uppercase)
}

fn map_string<'b, 'v>(
    name: &str,
    args: &[CowVal<'b, 'v>],
    f: fn(&str) -> String,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let s = args
        .first()
        .and_then(|a| a.downcast_ref::<CelString>())
        .ok_or_else(|| ExecutionError::function_error(name, "expects one string"))?;
    Ok(CowVal::owned(CelString::from(f(s.inner()))))
}

/// The string argument at `index`, checking the count.
fn string_arg<'a>(
    ftx: &'a FunctionContext<'_, '_>,
    index: usize,
    count: usize,
) -> Result<&'a str, ExecutionError> {
    if ftx.this.is_some() || ftx.args.len() != count {
        return Err(ExecutionError::function_error(
            ftx.name,
            format!("takes {count} argument(s): the field name first"),
        ));
    }
    ftx.args[index]
        .downcast_ref::<CelString>()
        .map(|s| s.inner())
        .ok_or_else(|| ftx.error("the field name must be a string"))
}

fn bool_result<'c, 'k>(b: bool) -> Result<CowVal<'c, 'k>, ExecutionError> {
    Ok(CowVal::owned(CelBool::from(b)))
}

/// `has_field('f')`: whether the current state has a top-level field `f` (even one set to null).
fn has_field<'c, 'k>(ftx: &mut FunctionContext<'c, 'k>) -> Result<CowVal<'c, 'k>, ExecutionError> {
    let field = string_arg(ftx, 0, 1)?;
    let fields = ftx
        .ptx
        .get_variable(DATA_FIELDS)
        .ok_or_else(|| ExecutionError::undeclared_reference(DATA_FIELDS))?;
    let present = match fields.as_container() {
        Some(container) => container.contains(&CelString::from(field))?,
        None => false,
    };
    bool_result(present)
}

/// `f` applied to the change of `field` (a map `{'old': v, 'new': v}`, `None` if the field did
/// not change); the `NO_BEFORE_IMAGE` error if the event cannot say what changed.
fn lookup_change<'c, 'k>(
    ftx: &FunctionContext<'c, 'k>,
    field: &str,
    f: impl FnOnce(Option<&CelMap<'_>>) -> bool,
) -> Result<bool, ExecutionError> {
    let changes = ftx
        .ptx
        .get_variable(CHANGES)
        .ok_or_else(|| ExecutionError::undeclared_reference(CHANGES))?;
    let Some(changes) = changes.downcast_ref::<CelMap>() else {
        return Err(ExecutionError::function_error(NO_BEFORE_IMAGE, field));
    };
    let change = changes
        .get(&CelMapKey::from(field))
        .and_then(|c| c.downcast_ref::<CelMap>());
    Ok(f(change))
}

/// The `old` or `new` side of a change map.
fn side<'a, 'v>(change: &'a CelMap<'v>, key: &'static str) -> Option<&'a (dyn Val + 'v)> {
    change.get(&CelMapKey::from(key)).map(|v| v.as_ref())
}

/// `field_changed('f')`.
fn field_changed<'c, 'k>(
    ftx: &mut FunctionContext<'c, 'k>,
) -> Result<CowVal<'c, 'k>, ExecutionError> {
    let field = string_arg(ftx, 0, 1)?;
    bool_result(lookup_change(ftx, field, |change| change.is_some())?)
}

/// `field_changed_to('f', v)`: `f` changed and its new value equals `v`.
fn field_changed_to<'c, 'k>(
    ftx: &mut FunctionContext<'c, 'k>,
) -> Result<CowVal<'c, 'k>, ExecutionError> {
    let field = string_arg(ftx, 0, 2)?;
    let value = ftx.args[1].as_ref();
    bool_result(lookup_change(ftx, field, |change| {
        change
            .and_then(|c| side(c, "new"))
            .is_some_and(|new| new.equals(value))
    })?)
}

/// `field_changed_from('f', v)`: `f` changed and its old value equals `v`.
fn field_changed_from<'c, 'k>(
    ftx: &mut FunctionContext<'c, 'k>,
) -> Result<CowVal<'c, 'k>, ExecutionError> {
    let field = string_arg(ftx, 0, 2)?;
    let value = ftx.args[1].as_ref();
    bool_result(lookup_change(ftx, field, |change| {
        change
            .and_then(|c| side(c, "old"))
            .is_some_and(|old| old.equals(value))
    })?)
}

// ---------------------------------------------------------------------------------------------
// Compile-time checks.

/// The deepest nesting of `(`, `[` and `{` outside string literals and comments.
fn nesting_depth(source: &str) -> usize {
    let bytes = source.as_bytes();
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            quote @ (b'\'' | b'"') => {
                i = skip_string(bytes, i, quote);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    max
}

/// The index just past the string literal whose opening quote is at `start`.
fn skip_string(bytes: &[u8], start: usize, quote: u8) -> usize {
    let before = |n: usize| start.checked_sub(n).map(|i| bytes[i].to_ascii_lowercase());
    let raw = before(1) == Some(b'r') || (before(1) == Some(b'b') && before(2) == Some(b'r'));
    let triple = bytes[start..].starts_with(&[quote; 3]);
    let mut i = start + if triple { 3 } else { 1 };
    while i < bytes.len() {
        if !raw && bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if triple && bytes[i..].starts_with(&[quote; 3]) {
            return i + 3;
        }
        if !triple && bytes[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    bytes.len()
}

/// The depth of the expression tree: what evaluating it recurses through.
fn expression_depth(expr: &cel::IdedExpr) -> usize {
    use cel::common::ast::EntryExpr;
    let entry_depth = |entry: &EntryExpr| match entry {
        EntryExpr::StructField(field) => expression_depth(&field.value),
        EntryExpr::MapEntry(entry) => {
            expression_depth(&entry.key).max(expression_depth(&entry.value))
        }
    };
    1 + match &expr.expr {
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| expression_depth(t))
            .chain(call.args.iter().map(expression_depth))
            .max()
            .unwrap_or(0),
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .map(expression_depth)
        .max()
        .unwrap_or(0),
        Expr::List(list) => list
            .elements
            .iter()
            .map(expression_depth)
            .max()
            .unwrap_or(0),
        Expr::Map(map) => map
            .entries
            .iter()
            .map(|e| entry_depth(&e.expr))
            .max()
            .unwrap_or(0),
        Expr::Struct(s) => s
            .entries
            .iter()
            .map(|e| entry_depth(&e.expr))
            .max()
            .unwrap_or(0),
        Expr::Select(select) => expression_depth(&select.operand),
        _ => 0,
    }
}

/// Rejects calls to functions that exist neither in CEL's library nor among ours, so a typo
/// (`field_chnaged`) fails when the configuration loads rather than on every event.
fn check_functions(expr: &cel::IdedExpr, env: &Arc<Env>) -> Result<(), ConditionError> {
    let mut calls = Vec::new();
    collect_calls(expr, &mut calls);
    if calls.is_empty() {
        return Ok(());
    }
    // `Context::add_function` refuses exactly the names the `Env` declares (as functions or
    // member functions): the public way to ask whether a name is declared.
    let mut probe = Context::with_env(Arc::clone(env));
    let mut declared = |name: &str| probe.add_function(name, |x: i64| x).is_err();
    for (name, namespace) in calls {
        let operator = !name.starts_with(|c: char| c.is_ascii_alphabetic());
        let known = operator
            || OUR_FUNCTIONS.contains(&name)
            || declared(name)
            || namespace
                .as_deref()
                .is_some_and(|ns| declared(&format!("{ns}.{name}")));
        if !known {
            return Err(ConditionError::UnknownFunction {
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// Every call in `expr`: its name, and the qualified name of its target when the target is
/// written as one (`optional.of(x)` may call the function `optional.of`).
fn collect_calls<'e>(expr: &'e cel::IdedExpr, calls: &mut Vec<(&'e str, Option<String>)>) {
    match &expr.expr {
        Expr::Call(call) => {
            let namespace = call.target.as_deref().and_then(qualified_name);
            calls.push((call.func_name.as_str(), namespace));
            if let Some(target) = &call.target {
                collect_calls(target, calls);
            }
            for arg in &call.args {
                collect_calls(arg, calls);
            }
        }
        Expr::Comprehension(c) => {
            for e in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect_calls(e, calls);
            }
        }
        Expr::List(list) => {
            for e in &list.elements {
                collect_calls(e, calls);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                collect_entry(&entry.expr, calls);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                collect_entry(&entry.expr, calls);
            }
        }
        Expr::Select(select) => collect_calls(&select.operand, calls),
        _ => {}
    }
}

fn collect_entry<'e>(
    entry: &'e cel::common::ast::EntryExpr,
    calls: &mut Vec<(&'e str, Option<String>)>,
) {
    use cel::common::ast::EntryExpr;
    match entry {
        EntryExpr::StructField(field) => collect_calls(&field.value, calls),
        EntryExpr::MapEntry(entry) => {
            collect_calls(&entry.key, calls);
            collect_calls(&entry.value, calls);
        }
    }
}

/// `a.b.c` for an identifier or a chain of selects on one, else `None`.
fn qualified_name(expr: &cel::IdedExpr) -> Option<String> {
    match &expr.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(select) if !select.test => {
            qualified_name(&select.operand).map(|prefix| format!("{prefix}.{}", select.field))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Binding an event: names resolve lazily, converting only what they name.

/// What one evaluation sees of one event. A whole reserved map is converted on first use and
/// kept; a bare field or a dotted path converts only its value, on each lookup (usually a
/// scalar; strings are borrowed).
struct Bindings<'a> {
    event: &'a EntityEvent,
    data: &'a Value,
    before: OnceLock<Box<dyn Val + 'a>>,
    after: OnceLock<Box<dyn Val + 'a>>,
    data_map: OnceLock<Box<dyn Val + 'a>>,
    event_map: OnceLock<Box<dyn Val + 'a>>,
    changes: OnceLock<Box<dyn Val + 'a>>,
    data_fields: DataFields<'a>,
    /// Set to the variable whose data was too deep to convert (converted as `null`).
    too_deep: OnceLock<&'static str>,
}

impl<'a> Bindings<'a> {
    fn new(event: &'a EntityEvent) -> Bindings<'a> {
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
            "before" => (e.before.as_ref()?, "before"),
            "after" => (e.after.as_ref()?, "after"),
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
                let change = e.changes.as_ref()?.iter().find(|c| c.field == field)?;
                let side = match segments.next()? {
                    "old" => change.old.as_ref(),
                    "new" => change.new.as_ref(),
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

    /// `changes`: from the event's own list; for a create or a delete without one, every field of
    /// the single image (from or to absent); otherwise unknown (`null`).
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
        let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = match (&e.changes, e.kind) {
            (Some(changes), _) => changes
                .iter()
                .map(|FieldChange { field, old, new }| change(field, old.as_ref(), new.as_ref()))
                .collect(),
            (None, EventKind::Created) => object_fields(e.after.as_ref())
                .map(|(k, v)| change(k, None, Some(v)))
                .collect(),
            (None, EventKind::Deleted) if e.before.is_some() => object_fields(e.before.as_ref())
                .map(|(k, v)| change(k, Some(v), None))
                .collect(),
            (None, _) => return Box::new(CelNull),
        };
        Box::new(CelMap::from(map))
    }
}

fn object_fields(value: Option<&Value>) -> impl Iterator<Item = (&str, &Value)> {
    value
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v)))
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
                self.convert_optional(event.before.as_ref(), 0, "before")
            }),
            "after" => Self::cached(&self.after, || {
                self.convert_optional(event.after.as_ref(), 0, "after")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{diff_fields, Position};
    use chrono::Utc;
    use serde_json::json;
    use uuid::Uuid;

    const TENANT: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    fn event(
        kind: EventKind,
        before: Option<Value>,
        after: Option<Value>,
        changes: Option<Vec<FieldChange>>,
    ) -> EntityEvent {
        EntityEvent {
            id: Uuid::from_u128(1),
            sequence: 42,
            kind,
            entity_type: "Order".to_owned(),
            entity_id: Uuid::from_u128(2),
            tenant: Some(TENANT.parse().unwrap()),
            author: Some("ada".to_owned()),
            before,
            after,
            changes,
            change_status: "updated".to_owned(),
            extra_metadata: json!({"source_app": "backoffice"}),
            source: Some(json!({"schema": "public", "table": "tb_order", "txId": 7})),
            created_at: Utc::now(),
            source_ts: None,
            position: Position {
                batch: 1,
                sequence: 42,
            },
        }
    }

    /// An update with both images, its changes computed as the parser does.
    fn update(before: Value, after: Value) -> EntityEvent {
        let changes = diff_fields(&before, &after);
        event(EventKind::Updated, Some(before), Some(after), Some(changes))
    }

    /// An update logged without a before-image: what changed cannot be known.
    fn update_without_before(after: Value) -> EntityEvent {
        event(EventKind::Updated, None, Some(after), None)
    }

    fn create(after: Value) -> EntityEvent {
        let changes = diff_fields(&Value::Null, &after);
        event(EventKind::Created, None, Some(after), Some(changes))
    }

    fn delete(before: Value) -> EntityEvent {
        let changes = diff_fields(&before, &Value::Null);
        event(EventKind::Deleted, Some(before), None, Some(changes))
    }

    fn eval(source: &str, event: &EntityEvent) -> Result<bool, ConditionError> {
        Condition::compile(source)
            .unwrap_or_else(|e| panic!("`{source}` does not compile: {e}"))
            .evaluate(event)
    }

    #[track_caller]
    fn assert_cases(event: &EntityEvent, cases: &[(&str, bool)]) {
        for (source, expected) in cases {
            match eval(source, event) {
                Ok(got) => assert_eq!(got, *expected, "`{source}`"),
                Err(e) => panic!("`{source}` failed: {e}"),
            }
        }
    }

    fn order() -> EntityEvent {
        update(
            json!({"status": "pending", "total": 90, "address": {"city": "Lyon"}}),
            json!({
                "status": "shipped", "total": 150, "priority": "high", "cancelled": false,
                "name": "Ada", "email": "ada@example.org", "address": {"city": "Paris"},
                "tags": ["new", "vip"], "note": null
            }),
        )
    }

    #[test]
    fn condition_and_error_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Condition>();
        assert_send_sync::<ConditionError>();
    }

    #[test]
    fn dsl_comparisons_and_connectives() {
        assert_cases(
            &order(),
            &[
                ("status == 'shipped' && total > 100", true),
                ("status == 'shipped' && total > 200", false),
                ("status == 'pending' && total > 100", false),
                ("status == 'pending' || total > 100", true),
                ("status == 'pending' || total < 100", false),
                ("!cancelled", true),
                ("!(status == 'shipped')", false),
                ("status != 'shipped'", false),
                (
                    "(status == 'pending' || priority == 'high') && !cancelled",
                    true,
                ),
                (
                    "status == 'pending' || (priority == 'high' && cancelled)",
                    false,
                ),
                ("total >= 150 && total <= 150", true),
                ("total > 100 ? priority == 'high' : false", true),
            ],
        );
    }

    #[test]
    fn in_lists_and_string_functions() {
        assert_cases(
            &order(),
            &[
                ("status in ['shipped', 'delivered']", true),
                ("status in ['pending', 'delivered']", false),
                ("'vip' in tags", true),
                ("'gold' in tags", false),
                ("size(tags) == 2", true),
                ("tags.exists(t, t.startsWith('v'))", true),
                ("tags.all(t, t.startsWith('v'))", false),
                ("lower(name) == 'ada'", true),
                ("upper(name) == 'ADA'", true),
                ("name.lower() == 'ada' && name.upper() == 'ADA'", true),
                ("lower(name) == 'Ada'", false),
                ("upper('straße') == 'STRASSE'", true),
                ("email.endsWith('@example.org')", true),
                ("email.startsWith('bob')", false),
                ("email.contains('@')", true),
                ("email.matches('^[a-z]+@example\\\\.org$')", true),
                ("email.matches('^bob@')", false),
                ("size(name) == 3", true),
            ],
        );
    }

    #[test]
    fn dotted_paths_into_before_after_and_data() {
        let e = order();
        assert_cases(
            &e,
            &[
                ("after.address.city == 'Paris'", true),
                ("before.address.city == 'Paris'", false),
                (
                    "before.address.city == 'Lyon' && after.address.city == 'Paris'",
                    true,
                ),
                ("data.address.city == 'Paris'", true),
                ("address.city == 'Paris'", true),
                ("data.status == status", true),
                ("has(after.address)", true),
                ("has(after.address.zip)", false),
                ("has(before.priority)", false),
                ("after != null && before != null", true),
            ],
        );
        // A key missing under a map is CEL's error, not false: test it with has().
        // So is selecting into a list, a string or null, at any depth of the path.
        for source in [
            "after.address.zip == '75001'",
            "after.tags.first == 'new'",
            "after.name.first == 'A'",
            "note.text == 'x'",
            "changes.status.older == 'x'",
            "changes.nickname.old == null",
            "event.nope == 1",
            "event.kind.x == 1",
        ] {
            assert!(
                matches!(eval(source, &e), Err(ConditionError::Evaluation { .. })),
                "`{source}`"
            );
        }
        assert!(matches!(
            eval("before.status == 'x'", &create(json!({"status": "new"}))),
            Err(ConditionError::Evaluation { .. })
        ));
        // `before` is null on a create, `after` on a delete; `data` is the state that exists.
        let created = create(json!({"status": "new"}));
        assert_cases(
            &created,
            &[("before == null", true), ("data.status == 'new'", true)],
        );
        let deleted = delete(json!({"status": "archived"}));
        assert_cases(
            &deleted,
            &[
                ("after == null", true),
                ("data.status == 'archived'", true),
                ("status == 'archived'", true),
            ],
        );
    }

    #[test]
    fn event_metadata() {
        let mut e = order();
        assert_cases(
            &e,
            &[
                ("event.kind == 'UPDATE'", true),
                ("event.kind == 'INSERT'", false),
                ("event.op == 'u'", true),
                ("event.entity_type == 'Order'", true),
                (
                    "event.entity_id == '00000000-0000-0000-0000-000000000002'",
                    true,
                ),
                ("event.id == '00000000-0000-0000-0000-000000000001'", true),
                ("event.sequence == 42", true),
                ("event.sequence > 42", false),
                (&format!("event.tenant == '{TENANT}'"), true),
                ("event.author == 'ada'", true),
                ("event.change_status == 'updated'", true),
                ("event.extra_metadata.source_app == 'backoffice'", true),
                ("event.source.table == 'tb_order'", true),
                ("event.source.txId == 7", true),
            ],
        );
        e.tenant = None;
        e.author = None;
        e.source = None;
        assert_cases(
            &e,
            &[
                ("event.tenant == null", true),
                ("event.author == null", true),
                ("event.source == null", true),
            ],
        );
        for (kind, name, op) in [
            (EventKind::Created, "INSERT", "c"),
            (EventKind::Deleted, "DELETE", "d"),
            (EventKind::Custom, "CUSTOM", "r"),
        ] {
            e.kind = kind;
            let source = format!("event.kind == '{name}' && event.op == '{op}'");
            assert_cases(&e, &[(source.as_str(), true)]);
        }
    }

    #[test]
    fn a_missing_bare_field_is_null() {
        assert_cases(
            &order(),
            &[
                ("nickname == null", true),
                ("nickname == 'x'", false),
                ("nickname != 'x'", true),
                ("note == null", true),
                ("status == null", false),
            ],
        );
        // Ordering null against a number has no answer: an error, not false.
        assert!(matches!(
            eval("nickname > 1", &order()),
            Err(ConditionError::Evaluation { .. })
        ));
        // Type names still name types when no field has them.
        assert_cases(
            &order(),
            &[("type(total) == int", true), ("type(name) == string", true)],
        );
    }

    #[test]
    fn has_field_reports_presence_even_of_null() {
        assert_cases(
            &order(),
            &[
                ("has_field('status')", true),
                ("has_field('note')", true),
                ("has_field('nickname')", false),
                ("has_field('city')", false),
                ("!has_field('nickname') || nickname == 'x'", true),
            ],
        );
        assert_cases(
            &delete(json!({"status": "archived"})),
            &[("has_field('status')", true)],
        );
    }

    #[test]
    fn field_changed_on_an_update_with_before_image() {
        assert_cases(
            &order(),
            &[
                ("field_changed('status')", true),
                ("field_changed('total')", true),
                ("field_changed('priority')", true),
                ("field_changed('cancelled')", true),
                ("field_changed('nickname')", false),
                ("field_changed_to('status', 'shipped')", true),
                ("field_changed_to('status', 'pending')", false),
                ("field_changed_to('nickname', null)", false),
                ("field_changed_from('status', 'pending')", true),
                ("field_changed_from('status', 'shipped')", false),
                ("field_changed_from('priority', null)", true),
                (
                    "changes.status.old == 'pending' && changes.status.new == 'shipped'",
                    true,
                ),
                ("'status' in changes && !('nickname' in changes)", true),
            ],
        );
        let unchanged = update(
            json!({"status": "a", "n": 1}),
            json!({"status": "a", "n": 1}),
        );
        assert_cases(
            &unchanged,
            &[
                ("field_changed('status')", false),
                ("field_changed_to('status', 'a')", false),
                ("field_changed_from('status', 'a')", false),
                ("size(changes) == 0", true),
            ],
        );
        // A removed field changed to absent, which compares as null.
        let removed = update(json!({"status": "a", "gone": 1}), json!({"status": "a"}));
        assert_cases(
            &removed,
            &[
                ("field_changed('gone')", true),
                ("field_changed_to('gone', null)", true),
                ("field_changed_from('gone', 1)", true),
                ("changes.gone.old == 1 && changes.gone.new == null", true),
            ],
        );
    }

    #[test]
    fn field_changed_without_before_image_is_an_error_never_false() {
        let e = update_without_before(json!({"status": "shipped"}));
        for source in [
            "field_changed('status')",
            "field_changed_to('status', 'shipped')",
            "field_changed_from('status', 'pending')",
            "!field_changed('status')",
            "event.kind == 'UPDATE' && field_changed('status')",
            "field_changed('status') || status == 'pending'",
        ] {
            match eval(source, &e) {
                Err(ConditionError::NoBeforeImage { field }) => assert_eq!(field, "status"),
                other => panic!("`{source}`: expected NoBeforeImage, got {other:?}"),
            }
        }
        let err = eval("field_changed('status')", &e).unwrap_err();
        assert!(err.to_string().contains("before-image"), "{err}");
        // CEL's connectives decide without the unknown side when the other decides alone.
        assert_cases(
            &e,
            &[
                ("status == 'pending' && field_changed('status')", false),
                ("status == 'shipped' || field_changed('status')", true),
            ],
        );
        // `changes` itself is null: nothing is assumed.
        assert_cases(&e, &[("changes == null", true)]);
    }

    #[test]
    fn field_changed_on_a_create_counts_every_present_field() {
        let e = create(json!({"status": "new", "total": 10}));
        assert_cases(
            &e,
            &[
                ("field_changed('status')", true),
                ("field_changed('nickname')", false),
                ("field_changed_to('status', 'new')", true),
                ("field_changed_from('status', null)", true),
                ("field_changed_to('total', 10.0)", true),
            ],
        );
        // The same when the create carries no change list: a create has no before-image to miss.
        let bare = event(
            EventKind::Created,
            None,
            Some(json!({"status": "new"})),
            None,
        );
        assert_cases(
            &bare,
            &[
                ("field_changed_to('status', 'new')", true),
                (
                    "changes.status.old == null && changes.status.new == 'new'",
                    true,
                ),
            ],
        );
        let deleted = event(
            EventKind::Deleted,
            Some(json!({"status": "old"})),
            None,
            None,
        );
        assert_cases(
            &deleted,
            &[(
                "field_changed_from('status', 'old') && field_changed_to('status', null)",
                true,
            )],
        );
    }

    #[test]
    fn numbers_compare_by_value_strings_never_equal_numbers() {
        // As PostgreSQL sends them: `100.00` (numeric), `100` (integer), `100.0` (float).
        for raw in [
            r#"{"total": 100.00}"#,
            r#"{"total": 100}"#,
            r#"{"total": 100.0}"#,
        ] {
            let after: Value = serde_json::from_str(raw).unwrap();
            let e = create(after);
            assert_cases(
                &e,
                &[
                    ("total == 100", true),
                    ("total == 100.0", true),
                    ("100 == total", true),
                    ("100.0 == total", true),
                    ("total != 100", false),
                    ("total == 100.5", false),
                    ("total < 100.5 && total > 99", true),
                    ("total >= 100 && total <= 100", true),
                    ("100 <= total && 99.5 < total", true),
                    ("total > 100", false),
                    ("total in [100, 200]", true),
                    ("total in [100.0, 200.0]", true),
                    ("total in [99, 101]", false),
                    ("total == '100'", false),
                    ("'100' == total", false),
                    ("double('100') == total", true),
                    ("int('100') == total", true),
                    ("string(int(total)) == '100'", true),
                    ("field_changed_to('total', 100)", true),
                    ("field_changed_to('total', 100.0)", true),
                    ("field_changed_to('total', '100')", false),
                ],
            );
        }
        let e = update(json!({"total": 100}), json!({"total": 100.5}));
        assert_cases(
            &e,
            &[
                ("field_changed_from('total', 100.0)", true),
                ("field_changed_to('total', 100.5)", true),
                ("total > 100 && total < 101", true),
            ],
        );
        // A JSON integer beyond i64 is a uint, still compared by value.
        let big = create(json!({"n": u64::MAX}));
        assert_cases(
            &big,
            &[("n > 0", true), ("n == 18446744073709551615u", true)],
        );
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_with_their_position() {
        match Condition::compile("status == 'shipped' &&") {
            Err(ConditionError::Syntax {
                line,
                column,
                message,
            }) => {
                assert_eq!(line, 1);
                assert!(column > 0, "column {column}");
                assert!(!message.is_empty());
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        for source in [
            "status = 'x'",
            "status == 'x",
            "(status == 'x'",
            "",
            "total >",
        ] {
            let err = Condition::compile(source).unwrap_err();
            assert!(
                matches!(err, ConditionError::Syntax { .. }),
                "`{source}`: {err:?}"
            );
            assert!(err.to_string().contains("line 1"), "`{source}`: {err}");
        }
        let err = Condition::compile("status == 'a'\n  && total >> 1").unwrap_err();
        assert!(
            matches!(err, ConditionError::Syntax { line: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_functions_are_rejected_at_compile() {
        for (source, name) in [
            ("field_chnaged('status')", "field_chnaged"),
            ("status.startWith('s')", "startWith"),
            ("[1].exists(x, nope(x))", "nope"),
            ("lowercase(name) == 'a'", "lowercase"),
        ] {
            match Condition::compile(source) {
                Err(ConditionError::UnknownFunction { name: got }) => assert_eq!(got, name),
                other => panic!("`{source}`: expected UnknownFunction, got {other:?}"),
            }
        }
        for source in [
            "optional.of(1).hasValue()",
            "timestamp('2024-01-01T00:00:00Z') < timestamp('2025-01-01T00:00:00Z')",
            "duration('1h') > duration('1m')",
            "math_free == null",
        ] {
            assert!(eval(source, &order()).unwrap(), "`{source}`");
        }
    }

    #[test]
    fn oversized_and_overnested_sources_are_rejected() {
        let long = format!("status == '{}'", "x".repeat(MAX_SOURCE_LEN));
        assert!(matches!(
            Condition::compile(&long),
            Err(ConditionError::TooLarge {
                max: MAX_SOURCE_LEN,
                ..
            })
        ));
        let at_limit = format!("{}true{}", "(".repeat(32), ")".repeat(32));
        assert!(Condition::compile(&at_limit).is_ok());
        let too_deep = format!("{}true{}", "(".repeat(33), ")".repeat(33));
        assert!(matches!(
            Condition::compile(&too_deep),
            Err(ConditionError::TooDeep { depth: 33, max: 32 })
        ));
        let brackets = format!("{}1{} == 1", "[".repeat(40), "]".repeat(40));
        assert!(matches!(
            Condition::compile(&brackets),
            Err(ConditionError::TooDeep { .. })
        ));
        // Brackets inside strings and comments do not nest.
        let quoted = format!(
            "status != '{}' // {}\n && status != \"{}\" && status != r'\\' && status != '''{}'''",
            "(".repeat(40),
            "[".repeat(40),
            "\\\"".repeat(3) + &"{".repeat(40),
            "(".repeat(40)
        );
        assert!(eval(&quoted, &order()).unwrap(), "{quoted}");
        // A deep expression tree without any bracket: evaluation would recurse through it.
        let chain = format!("{} == 1", vec!["1"; 40].join(" + "));
        assert!(matches!(
            Condition::compile(&chain),
            Err(ConditionError::TooDeep { .. })
        ));
        // The longest chain within the size bound compiles without exhausting the stack.
        let longest = vec!["1"; MAX_SOURCE_LEN / 4].join(" + ");
        assert!(matches!(
            Condition::compile(&longest),
            Err(ConditionError::TooDeep { .. })
        ));
    }

    #[test]
    fn evaluation_errors_never_carry_event_values() {
        let e = create(json!({"password": "hunter2", "pin": 7, "list": [1]}));
        for source in [
            "password > 1",
            "password + 1 == 2",
            "int(password) == 1",
            "pin / 0 == 1",
            "list[pin] == 1",
            "{password: 1}[password] == 1 && pin > 'x'",
        ] {
            match eval(source, &e) {
                Err(err @ ConditionError::Evaluation { .. }) => {
                    let text = err.to_string();
                    assert!(
                        !text.contains("hunter2") && !text.contains('7'),
                        "`{source}`: {text}"
                    );
                }
                other => panic!("`{source}`: expected an evaluation error, got {other:?}"),
            }
        }
        let err = eval("password > 1", &e).unwrap_err();
        assert_eq!(
            err.to_string(),
            "condition could not be evaluated: found no matching overload for '_>_' applied to '(string, int)'"
        );
    }

    /// Evaluation recurses on the caller's stack: the deepest expressions `compile` accepts must
    /// evaluate on a 2 MiB stack (tokio's default for worker threads), in this debug build too.
    #[test]
    fn the_deepest_accepted_expressions_evaluate_on_a_2_mib_stack() {
        let nest = |n: usize, open: &str, inner: &str, close: &str| {
            format!("{}{inner}{}", open.repeat(n), close.repeat(n))
        };
        type Shape = Box<dyn Fn(usize) -> String>;
        let shapes: Vec<(&str, Shape)> = vec![
            (
                "sum",
                Box::new(|n| format!("{} > 0", vec!["total"; n].join(" + "))),
            ),
            (
                "calls",
                Box::new(move |n| format!("{} == 'ada'", nest(n, "lower(", "name", ")"))),
            ),
            (
                "comprehensions",
                Box::new(move |n| nest(n, "tags.exists(t, ", "field_changed('status')", ")")),
            ),
            (
                "ternaries",
                Box::new(move |n| nest(n, "status != '' ? (", "has_field('status')", ") : false")),
            ),
            (
                "lists",
                Box::new(move |n| format!("size({}) == 1", nest(n, "[", "total", "]"))),
            ),
            (
                "selects",
                Box::new(|n| format!("has(after{})", ".a".repeat(n))),
            ),
        ];
        let mut deep = json!({"leaf": true});
        for _ in 0..40 {
            deep = json!({ "a": deep });
        }
        let mut after = order().after.unwrap();
        after["a"] = deep["a"].clone();
        let e = update(order().before.unwrap(), after);
        for (name, shape) in shapes {
            let (n, condition) = (1..60)
                .rev()
                .find_map(|n| Condition::compile(&shape(n)).ok().map(|c| (n, c)))
                .unwrap_or_else(|| panic!("no {name} expression compiles"));
            assert!(n >= 10, "{name}: only {n} levels accepted");
            let e = e.clone();
            let result = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || condition.evaluate(&e).map_err(|err| err.to_string()))
                .unwrap()
                .join()
                .expect("evaluation overflowed a 2 MiB stack");
            assert!(result.is_ok(), "{name} x{n}: {result:?}");
        }
    }

    #[test]
    fn a_non_boolean_result_is_an_error() {
        for (source, found) in [
            ("total + 1", "int"),
            ("status", "string"),
            ("nickname", "null_type"),
            ("after", "map"),
        ] {
            match eval(source, &order()) {
                Err(ConditionError::NotBoolean { found: got }) => assert_eq!(got, found),
                other => panic!("`{source}`: expected NotBoolean, got {other:?}"),
            }
        }
    }

    #[test]
    fn reserved_names_shadow_fields_which_stay_reachable_through_data() {
        let e = create(json!({
            "before": "draft", "after": "final", "event": "launch", "changes": 3, "data": "x"
        }));
        assert_cases(
            &e,
            &[
                ("data.before == 'draft'", true),
                ("data.after == 'final'", true),
                ("data.event == 'launch'", true),
                ("data.changes == 3", true),
                ("data.data == 'x'", true),
                ("before == null", true),
                ("event.kind == 'INSERT'", true),
            ],
        );
    }

    #[test]
    fn comprehension_variables_shadow_fields_without_breaking_functions() {
        assert_cases(
            &order(),
            &[
                ("[1, 2].exists(status, status == 2)", true),
                (
                    "['x'].all(changes, changes == 'x' && field_changed('status'))",
                    true,
                ),
                ("['x'].all(data, data == 'x' && has_field('status'))", true),
            ],
        );
    }

    #[test]
    fn data_nested_too_deep_is_an_error_at_evaluation() {
        let mut deep = json!(1);
        for _ in 0..(MAX_DATA_DEPTH + 5) {
            deep = json!({ "x": deep });
        }
        let e = create(json!({"status": "new", "deep": deep}));
        // Not read: not converted, no error.
        assert_cases(
            &e,
            &[
                ("status == 'new'", true),
                ("has_field('deep')", true),
                ("data.status == 'new'", true),
                ("after.status == 'new'", true),
            ],
        );
        for source in [
            "deep != null",
            "has(after.status)",
            "size(data) > 0",
            "after.deep.x != null",
        ] {
            match eval(source, &e) {
                Err(ConditionError::DataTooDeep { max, .. }) => assert_eq!(max, MAX_DATA_DEPTH),
                other => panic!("`{source}`: expected DataTooDeep, got {other:?}"),
            }
        }
        let mut shallow = json!(1);
        for _ in 0..(MAX_DATA_DEPTH - 2) {
            shallow = json!({ "x": shallow });
        }
        let ok = create(json!({ "shallow": shallow }));
        assert_cases(&ok, &[("shallow != null", true)]);
    }

    /// The examples of the README's "Conditions" section, verbatim, against the event it
    /// describes.
    #[test]
    fn documented_examples_compile_and_evaluate() {
        let e = update(
            json!({"status": "pending", "total": 90, "address": {"city": "Lyon"}}),
            json!({
                "status": "shipped", "total": 100.00, "priority": "high", "cancelled": false,
                "amount_text": "100", "email": "Ada@Example.com", "address": {"city": "Paris"},
                "items": [{"sku": "BOOK-1"}], "before": "draft"
            }),
        );
        let documented = r#"
status == 'shipped' && total > 99
status in ['shipped', 'delivered'] || (priority == 'high' && !cancelled)
total == 100                   // true for 100, 100.0 and 100.00
'100' == total                 // false: a string never equals a number
double(amount_text) == 100.0   // convert explicitly
nickname == null               // an absent field is null
has_field('nickname')          // ...and not present
after.address.city == 'Paris' && before.address.city != 'Paris'
has(after.address.zip)         // test a key before reading it
event.kind == 'UPDATE' && event.tenant != null
field_changed('status') && field_changed_to('status', 'shipped')
field_changed_from('status', 'pending')
changes.status.old == 'pending'
lower(email).endsWith('@example.com')
data.before == 'draft'         // a field named like a reserved word
size(items) > 0 && items.exists(i, i.sku.startsWith('BOOK-'))
"#;
        let false_ones = [
            "'100' == total",
            "has_field('nickname')",
            "has(after.address.zip)",
        ];
        let mut count = 0;
        for line in documented.lines().filter(|l| !l.trim().is_empty()) {
            let expected = !false_ones.iter().any(|f| line.starts_with(f));
            assert_eq!(
                eval(line, &e).unwrap_or_else(|err| panic!("`{line}`: {err}")),
                expected,
                "`{line}`"
            );
            count += 1;
        }
        assert_eq!(count, 16);
        // The documented error: "did it change" on an update logged without a before-image.
        let no_before = update_without_before(json!({"status": "shipped"}));
        assert!(matches!(
            eval("field_changed('status')", &no_before),
            Err(ConditionError::NoBeforeImage { .. })
        ));
    }

    /// Not a benchmark: a rough per-evaluation figure, printed (`--nocapture`), never asserted.
    #[test]
    fn evaluation_timing_on_a_1kb_event() {
        let mut after = serde_json::Map::new();
        after.insert("status".into(), json!("shipped"));
        after.insert("total".into(), json!(150.25));
        after.insert(
            "customer".into(),
            json!({"name": "Ada Lovelace", "email": "ada@example.org", "tier": "gold"}),
        );
        after.insert(
            "items".into(),
            json!([{"sku": "BOOK-1", "qty": 2}, {"sku": "PEN-9", "qty": 10}]),
        );
        for i in 0..24 {
            after.insert(
                format!("attribute_{i:02}"),
                json!(format!("value number {i} of the order")),
            );
        }
        let after = Value::Object(after);
        let mut before = after.clone();
        before["status"] = json!("pending");
        let e = update(before, after);
        let size = serde_json::to_string(&e.after).unwrap().len();
        for source in [
            "status == 'shipped' && total > 100",
            "field_changed_to('status', 'shipped') && customer.tier in ['gold', 'platinum']",
            "event.kind == 'UPDATE' && after.total > before.total - 1.0",
            // Converts the whole after-image.
            "size(after) > 20",
        ] {
            let condition = Condition::compile(source).unwrap();
            let rounds = 20_000u32;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                assert!(condition.evaluate(&e).unwrap());
            }
            let per = start.elapsed() / rounds;
            println!(
                "condition timing: {per:?} per evaluation of `{source}` on a {size}-byte event"
            );
        }
    }
}
