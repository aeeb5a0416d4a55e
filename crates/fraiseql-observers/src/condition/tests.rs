//! Unit tests of conditions: the language, the errors, the bounds.

use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{Condition, ConditionError, MAX_DATA_DEPTH, MAX_SOURCE_LEN};
use crate::event::{EntityEvent, EventKind, Position};

const TENANT: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

fn event(kind: EventKind, before: Option<Value>, after: Option<Value>) -> EntityEvent {
    EntityEvent {
        id: Uuid::from_u128(1),
        sequence: 42,
        kind,
        entity_type: "Order".to_owned(),
        entity_id: Uuid::from_u128(2),
        tenant: Some(TENANT.parse().unwrap()),
        author: Some("ada".to_owned()),
        before: before.map(Into::into),
        after: after.map(Into::into),
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
    event(EventKind::Updated, Some(before), Some(after))
}

/// An update logged without a before-image: what changed cannot be known.
fn update_without_before(after: Value) -> EntityEvent {
    event(EventKind::Updated, None, Some(after))
}

fn create(after: Value) -> EntityEvent {
    event(EventKind::Created, None, Some(after))
}

fn delete(before: Value) -> EntityEvent {
    event(EventKind::Deleted, Some(before), None)
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
    let bare = event(EventKind::Created, None, Some(json!({"status": "new"})));
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
    let deleted = event(EventKind::Deleted, Some(json!({"status": "old"})), None);
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
    let mut after = order().after.unwrap().value().clone();
    after["a"] = deep["a"].clone();
    let e = update(order().before.unwrap().value().clone(), after);
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
        println!("condition timing: {per:?} per evaluation of `{source}` on a {size}-byte event");
    }
}
