//! The FraiseQL functions added to CEL's standard library (`has_field`, `field_changed`,
//! `field_changed_to`, `field_changed_from`, `lower`, `upper`), the runtime that carries them,
//! and the compile-time check that every function a condition calls exists. Pure.

use std::sync::{Arc, LazyLock};

use cel::common::ast::Expr;
use cel::common::functions::Function;
use cel::common::types::{CelBool, CelMap, CelMapKey, CelString, STRING_TYPE};
use cel::common::value::{CowVal, Val};
use cel::{Context, Env, ExecutionError, FunctionContext};

use super::bindings::{CHANGES, DATA_FIELDS};
use super::ConditionError;

/// A function added to the root context: it sees the evaluation's variables through `ptx`.
type ContextFunction = Box<
    dyn for<'c, 'k> Fn(&mut FunctionContext<'c, 'k>) -> Result<CowVal<'c, 'k>, ExecutionError>
        + Send
        + Sync,
>;

/// The function name an evaluation error carries when "did it change" has no answer; the
/// message is the field.
pub(super) const NO_BEFORE_IMAGE: &str = "#no_before_image";

/// The functions this module adds, resolved through the root context.
const OUR_FUNCTIONS: [&str; 4] = [
    "has_field",
    "field_changed",
    "field_changed_to",
    "field_changed_from",
];

pub(super) struct Runtime {
    pub(super) env: Arc<Env>,
    pub(super) root: Context<'static, 'static>,
}

pub(super) static RUNTIME: LazyLock<Runtime> = LazyLock::new(Runtime::new);

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

/// Rejects calls to functions that exist neither in CEL's library nor among ours, so a typo
/// (`field_chnaged`) fails when the configuration loads rather than on every event.
pub(super) fn check_functions(expr: &cel::IdedExpr, env: &Arc<Env>) -> Result<(), ConditionError> {
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
