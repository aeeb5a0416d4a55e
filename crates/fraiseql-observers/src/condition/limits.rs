//! The bounds a condition is held to: its source's size and nesting, the depth of the expression
//! tree it parses to, and the depth of event data it converts. Pure.

use cel::common::ast::Expr;

/// The longest source accepted, in bytes.
pub const MAX_SOURCE_LEN: usize = 4096;
/// The deepest nesting accepted: of parentheses, brackets and braces in the source, and of the
/// expression tree it parses to (`1 + 1 + 1` is 3 deep), which evaluation recurses through on
/// the caller's stack. 32 levels fit a 2 MiB thread stack even in a debug build.
pub const MAX_SOURCE_NESTING: usize = 32;
/// The deepest nesting of objects and arrays converted from an event's data.
pub const MAX_DATA_DEPTH: usize = 64;
/// The stack of the thread [`Condition::compile`](super::Condition::compile) parses on.
/// Parsing the worst source within the bounds needs less than 8 MiB in a debug build.
pub(super) const COMPILE_STACK_SIZE: usize = 16 << 20;

/// The deepest nesting of `(`, `[` and `{` outside string literals and comments.
pub(super) fn nesting_depth(source: &str) -> usize {
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
pub(super) fn expression_depth(expr: &cel::IdedExpr) -> usize {
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
