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

mod bindings;
mod functions;
mod limits;
#[cfg(test)]
mod tests;

use std::fmt;

use cel::common::types::CelBool;
use cel::{Context, ExecutionError, Program, Value as CelValue};

use crate::event::EntityEvent;

use bindings::Bindings;
use functions::{check_functions, NO_BEFORE_IMAGE, RUNTIME};
use limits::{expression_depth, nesting_depth, COMPILE_STACK_SIZE};
pub use limits::{MAX_DATA_DEPTH, MAX_SOURCE_LEN, MAX_SOURCE_NESTING};

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
