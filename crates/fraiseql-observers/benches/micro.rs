//! Micro-benchmarks of the per-event work, on a realistic order (20 columns, about 1 KB as JSON,
//! the envelope the capture trigger writes): decoding a change-log row, evaluating conditions
//! (one at a time, and the fan-out scenario's ten observers), rendering webhook bodies, signing.
//!
//! ```sh
//! cargo bench -p fraiseql-observers --bench micro
//! ```
//!
//! No database, no network: these are the CPU costs the end-to-end figures are made of.
//!
//! `micro --repeat STAGE N` runs one stage N times without timing (`--repeat list` names the
//! stages), for counting instructions under valgrind: `benches/instructions.sh` runs each stage
//! with N and 2N and divides the difference by N, which removes the start-up and the setup.

use fraiseql_observers::actions::webhook::{default_body, default_body_json, sign, SigningKey};
use fraiseql_observers::condition::Condition;
use fraiseql_observers::listener::parser::{decode, ChangeLogRow, TableShape};
use fraiseql_observers::template::{Template, TemplateMode};
use fraiseql_observers::{config, EntityEvent, EventMatcher, Position};
use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--repeat") {
        let stage = args.get(i + 1).map_or("list", String::as_str);
        if stage == "list" {
            println!("{}", STAGES.join("\n"));
            return;
        }
        let n: u64 = args
            .get(i + 2)
            .and_then(|v| v.parse().ok())
            .expect("--repeat STAGE N");
        repeat(stage, n);
        return;
    }
    divan::main();
}

/// The stages `--repeat` runs: the per-event work of the drain path, one at a time and together.
const STAGES: &[&str] = &[
    "decode_create",
    "decode_update",
    "condition",
    "match_ten_observers",
    "body_create",
    "body_update",
    "body_template",
    "signature",
    "drain_event",
    "decode_condition",
    "decode_match_ten",
    "decode_template",
];

/// Run `stage` `n` times on the benches' inputs (built once, before the loop).
fn repeat(stage: &str, n: u64) {
    let (shape, create, update) = (shape(), row(false), row(true));
    let (created, updated) = (event(false), event(true));
    let condition = Condition::compile("status == 'paid' && total > 100").expect("compiles");
    let (observers, matcher) = ten_observers();
    let template = Template::compile(TEMPLATE, TemplateMode::Json).expect("compiles");
    let keys = [SigningKey::new(&[7u8; 24])];
    let body = default_body_json(&updated);
    let id = "6f1e0b9c-8a71-5d3c-9e2a-1b4f4c8e9a6d";
    use divan::black_box as bb;
    for _ in 0..n {
        match stage {
            "decode_create" => drop(bb(decode(&shape, bb(&create), POSITION).expect("decodes"))),
            "decode_update" => drop(bb(decode(&shape, bb(&update), POSITION).expect("decodes"))),
            "condition" => drop(bb(condition.evaluate(bb(&updated)).expect("evaluates"))),
            "match_ten_observers" => drop(bb(matcher.evaluate(&observers, bb(&updated)))),
            "body_create" => drop(bb(default_body_json(bb(&created)))),
            "body_update" => drop(bb(default_body_json(bb(&updated)))),
            "body_template" => drop(bb(template.render(bb(&updated)).expect("renders"))),
            "signature" => drop(bb(sign(&keys, id, 1_767_607_872, bb(&body)))),
            // What the drain scenario does per event outside I/O: decode an update, one
            // observer's verdict (no condition), the default body, its signature.
            "drain_event" => {
                let event = decode(&shape, bb(&update), POSITION).expect("decodes");
                let body = default_body_json(&event);
                drop(bb(sign(&keys, id, 1_767_607_872, &body)));
            }
            // A fresh event per call, as the engine sees it: the images are parsed (once) by
            // whatever reads their values first, so a stage on a decoded-once event alone
            // would not count that parse.
            "decode_condition" => {
                let event = decode(&shape, bb(&update), POSITION).expect("decodes");
                bb(condition.evaluate(&event).expect("evaluates"));
            }
            "decode_match_ten" => {
                let event = decode(&shape, bb(&update), POSITION).expect("decodes");
                drop(bb(matcher.evaluate(&observers, &event)));
            }
            "decode_template" => {
                let event = decode(&shape, bb(&update), POSITION).expect("decodes");
                drop(bb(template.render(&event).expect("renders")));
            }
            other => panic!("unknown stage {other}; one of {STAGES:?}"),
        }
    }
}

fn order(g: u64, status: &str) -> Value {
    json!({
        "pk_order": g, "id": "3f2c7b9e-8d1a-4c5e-9b7f-1a2b3c4d5e6f",
        "fk_customer_org": "aaaaaaaa-0000-0000-0000-000000000001",
        "fk_user": "6f1e0b9c-8a71-4d3c-5e2a-1b4f4c8e9a6d",
        "order_number": format!("ORD-{g:010}"), "status": status, "total": 512.34,
        "currency": "EUR", "region": "eu", "priority": "normal",
        "customer_email": format!("customer{g}@Example.com"),
        "customer_name": format!("Customer Number {g} Longname"),
        "shipping_address": {"street": format!("{g} Rue de la Longue Avenue"), "city": "Paris", "zip": "75008", "country": "FR"},
        "billing_address": {"street": format!("{g} Billing Boulevard"), "city": "Lyon", "zip": "69001", "country": "FR", "vat_id": "FR00000012345"},
        "items": [
            {"sku": "BOOK-42", "name": "A book about things", "qty": 1, "price": 12.5},
            {"sku": "PEN-7", "name": "A blue pen", "qty": 2, "price": 1.2},
            {"sku": "BAG-3", "name": "A canvas bag", "qty": 1, "price": 8.9}
        ],
        "coupon_code": null,
        "notes": "Please leave the parcel with the concierge if nobody answers. Fragile items inside, handle with care. Gift wrap requested; include the card with the message happy birthday and the order number on the invoice, thanks.",
        "version": 1, "created_at": "2026-01-05T10:11:12.123456+00:00", "updated_at": "2026-01-05T10:11:12.123456+00:00"
    })
}

fn shape() -> TableShape {
    TableShape::mission()
}

fn row(update: bool) -> ChangeLogRow {
    let source = json!({"schema": "public", "table": "tb_order", "db": "shop", "txId": 123456,
                        "ts_ms": 1767607872123i64, "ts_us": 1767607872123456i64});
    let envelope = if update {
        json!({"before": order(7, "new"), "after": order(7, "paid"), "op": "u", "source": source})
    } else {
        json!({"before": null, "after": order(7, "new"), "op": "c", "source": source})
    };
    ChangeLogRow {
        sequence: 42,
        change_id: Some("0f8fad5b-d9cb-469f-a165-70867728950e".into()),
        tenant: Some("aaaaaaaa-0000-0000-0000-000000000001".into()),
        author: None,
        object_type: Some("Order".into()),
        object_id: Some("3f2c7b9e-8d1a-4c5e-9b7f-1a2b3c4d5e6f".into()),
        modification_type: Some(if update { "UPDATE" } else { "INSERT" }.into()),
        change_status: Some(if update { "updated" } else { "new" }.into()),
        object_data: Some(envelope.to_string()),
        object_data_before: None,
        extra_metadata: Some("{}".into()),
        created_at: Some(chrono::Utc::now()),
        commit_time: None,
    }
}

const POSITION: Position = Position {
    batch: 1,
    sequence: 42,
};

fn event(update: bool) -> EntityEvent {
    decode(&shape(), &row(update), POSITION).expect("decodes")
}

#[divan::bench(args = [false, true])]
fn decode_row(bencher: divan::Bencher, update: bool) {
    let (shape, row) = (shape(), row(update));
    bencher.bench(|| decode(&shape, divan::black_box(&row), POSITION).expect("decodes"));
}

#[divan::bench(args = [
    "total > 500",
    "status == 'paid' && total > 100",
    "field_changed_to('status', 'paid')",
    "lower(customer_email).endsWith('@example.com')",
    "coupon_code != null && size(items) >= 3",
])]
fn condition(bencher: divan::Bencher, source: &str) {
    let condition = Condition::compile(source).expect("compiles");
    let event = event(true);
    bencher.bench(|| {
        condition
            .evaluate(divan::black_box(&event))
            .expect("evaluates")
    });
}

/// The fan-out scenario's ten observers and their matcher.
fn ten_observers() -> (Vec<config::Observer>, EventMatcher) {
    let conditions = [
        "total > 500",
        "total <= 500",
        "region == 'eu'",
        "region == 'us'",
        "region in ['apac', 'latam']",
        "priority == 'high' && status != 'cancelled'",
        "field_changed('status')",
        "lower(customer_email).endsWith('@example.com')",
        "coupon_code != null && size(items) >= 3",
        "status == 'refunded'",
    ];
    let mut toml = String::new();
    for (i, c) in conditions.iter().enumerate() {
        toml.push_str(&format!(
            "[observers.o{i}]\nentity = \"Order\"\nevent_type = [\"INSERT\", \"UPDATE\"]\ncondition = \"{c}\"\n\
             [[observers.o{i}.actions]]\ntype = \"webhook\"\nurl = \"https://example.com/{i}\"\n\n"
        ));
    }
    let observers = config::load(&toml, &|_| None).expect("config").observers;
    let matcher = EventMatcher::new(&observers);
    (observers, matcher)
}

/// The fan-out scenario's ten observers matched against one update (verdicts for every candidate).
#[divan::bench]
fn match_ten_observers(bencher: divan::Bencher) {
    let (observers, matcher) = ten_observers();
    let event = event(true);
    bencher.bench(|| matcher.evaluate(&observers, divan::black_box(&event)));
}

/// The default webhook body (`{"type", "timestamp", "data": {...}}`) as sent.
#[divan::bench(args = [false, true])]
fn default_webhook_body(bencher: divan::Bencher, update: bool) {
    let event = event(update);
    bencher.bench(|| default_body_json(divan::black_box(&event)));
}

/// The same body through an intermediate `serde_json::Value` (how it was built before).
#[divan::bench(args = [false, true])]
fn default_webhook_body_via_value(bencher: divan::Bencher, update: bool) {
    let event = event(update);
    bencher.bench(|| default_body(divan::black_box(&event)).to_string());
}

const TEMPLATE: &str = r#"{"order": {{ after.order_number }}, "total": {{ after.total }}, "email": {{ after.customer_email }}, "tenant": {{ event.tenant }}, "status": {{ after.status }}}"#;

/// A JSON-mode body template (escaped by construction, checked to parse).
#[divan::bench]
fn body_template(bencher: divan::Bencher) {
    let template = Template::compile(TEMPLATE, TemplateMode::Json).expect("compiles");
    let event = event(true);
    bencher.bench(|| template.render(divan::black_box(&event)).expect("renders"));
}

/// The Standard Webhooks signature of a default body.
#[divan::bench]
fn signature(bencher: divan::Bencher) {
    let body = default_body_json(&event(true));
    let keys = [SigningKey::new(&[7u8; 24])];
    bencher.bench(|| {
        sign(
            &keys,
            "6f1e0b9c-8a71-5d3c-9e2a-1b4f4c8e9a6d",
            1_767_607_872,
            divan::black_box(&body),
        )
    });
}
