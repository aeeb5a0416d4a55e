//! The rabbitmq action against the real RabbitMQ on 127.0.0.1:5672 (guest/guest): messages are
//! read back from a queue bound to the test's own exchange. Each test declares its exchange and
//! queue under random names and deletes them.

use std::time::Duration;

use fraiseql_observers::actions::{Action, FailureKind};
use fraiseql_observers::config;
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::pipeline::{self, Pipeline};
use fraiseql_observers::testing::{eventually, TestDb};
use fraiseql_observers::EventKind;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::sample::{compile, env_of, order_event, run};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test's own exchange and queue.
struct Topology {
    _connection: Connection,
    channel: Channel,
    exchange: String,
    queue: String,
}

impl Topology {
    /// A fresh exchange (`kind`) and a queue; the queue is bound with `binding` unless `None`.
    async fn new(binding: Option<&str>) -> Topology {
        let n = rand::random::<u32>();
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = connection.create_channel().await.unwrap();
        let topology = Topology {
            _connection: connection,
            channel,
            exchange: format!("fo-test-{n}"),
            queue: format!("fo-test-{n}-q"),
        };
        topology
            .channel
            .exchange_declare(
                topology.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        topology
            .channel
            .queue_declare(
                topology.queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        if let Some(key) = binding {
            topology.bind(key).await;
        }
        topology
    }

    async fn bind(&self, key: &str) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// The next message of the queue, if any: routing key, properties, body.
    async fn get(&self) -> Option<(String, BasicProperties, Vec<u8>)> {
        let message = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()?;
        let delivery = message.delivery;
        Some((
            delivery.routing_key.as_str().to_string(),
            delivery.properties,
            delivery.data,
        ))
    }

    async fn delete(self) {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
    }
}

fn rabbitmq_action(fields: &str) -> Action {
    compile(
        &format!("type = \"rabbitmq\"\nurl_env = \"RABBITMQ_URL\"\n{fields}"),
        &env_of(&[("RABBITMQ_URL", AMQP_URL)]),
        None,
        None,
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

const RUNTIME: &str = r#"
[observers.runtime]
consumer_id = "rabbitmq-test"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
shutdown_timeout_ms = 5000
"#;

async fn schema(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_order (
                 pk_order INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 status TEXT NOT NULL, total NUMERIC(12,2) NOT NULL,
                 fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_order', 'Order', 'fk_customer_org');",
        )
        .await
        .unwrap();
    client
}

type Running = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
);

async fn start(db: &TestDb, observers: &str) -> fraiseql_observers::Result<Running> {
    let env = env_of(&[("RABBITMQ_URL", AMQP_URL)]);
    let config =
        config::load(&format!("{RUNTIME}\n{observers}"), &env).unwrap_or_else(|e| panic!("{e}"));
    let listener = fraiseql_observers::ListenerConfig {
        min_poll_interval: Duration::from_millis(2),
        ..pipeline::listener_config(&db.url, &config.runtime)
    };
    let pipeline = Pipeline::start_with(listener, config.observers, config.runtime).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    Ok((stop, handle))
}

fn observers(exchange: &str, extra: &str) -> String {
    format!(
        r#"
[observers.orders]
entity = "Order"
event_type = ["INSERT", "UPDATE"]

[[observers.orders.actions]]
type = "rabbitmq"
url_env = "RABBITMQ_URL"
exchange = "{exchange}"
routing_key = "orders.{{{{ event.entity_type }}}}.{{{{ event.kind }}}}"
{extra}
"#
    )
}

#[tokio::test]
async fn changes_arrive_persistent_with_routing_keys_ids_and_bodies_in_order() {
    let topology = Topology::new(Some("orders.#")).await;
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let (stop, engine) = start(&db, &observers(&topology.exchange, ""))
        .await
        .unwrap();
    let id: uuid::Uuid = client
        .query_one(
            "INSERT INTO tb_order (status, total, fk_customer_org) VALUES ('new', 10, gen_random_uuid()) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for status in ["paid", "shipped"] {
        client
            .execute(
                "UPDATE tb_order SET status = $1 WHERE id = $2",
                &[&status, &id],
            )
            .await
            .unwrap();
    }
    let messages = std::cell::RefCell::new(Vec::new());
    eventually(
        Duration::from_secs(20),
        "three messages in the queue",
        || {
            let (topology, messages) = (&topology, &messages);
            async move {
                while let Some(message) = topology.get().await {
                    messages.borrow_mut().push(message);
                }
                (messages.borrow().len() >= 3).then_some(())
            }
        },
    )
    .await;
    let messages = messages.into_inner();
    let _ = stop.send(());
    engine.await.unwrap().unwrap();

    assert_eq!(messages.len(), 3);
    let mut statuses = Vec::new();
    for (i, (routing_key, properties, data)) in messages.iter().enumerate() {
        let body: Value = serde_json::from_slice(data).unwrap();
        let kind = if i == 0 { "INSERT" } else { "UPDATE" };
        assert_eq!(routing_key, &format!("orders.Order.{kind}"));
        assert_eq!(body["data"]["entity_id"], id.to_string());
        let event_id: uuid::Uuid = body["data"]["id"].as_str().unwrap().parse().unwrap();
        let expected = delivery_id(event_id, "orders", 0);
        assert_eq!(
            properties.message_id().as_ref().map(|m| m.as_str()),
            Some(expected.as_str())
        );
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            properties.content_type().as_ref().map(|m| m.as_str()),
            Some("application/json")
        );
        assert_eq!(
            properties.kind().as_ref().map(|m| m.as_str()),
            body["type"].as_str()
        );
        let headers = properties.headers().as_ref().unwrap().inner();
        match headers.get("webhook-id") {
            Some(AMQPValue::LongString(s)) => assert_eq!(s.to_string(), expected),
            other => panic!("webhook-id header: {other:?}"),
        }
        statuses.push(
            body["data"]["after"]["status"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // One entity's changes are published in commit order.
    assert_eq!(statuses, ["new", "paid", "shipped"]);
    topology.delete().await;
}

#[tokio::test]
async fn a_missing_exchange_stops_the_start_and_exchange_type_declares_it() {
    let db = TestDb::new().await;
    schema(&db).await;
    let exchange = format!("fo-test-{}-missing", rand::random::<u32>());
    let error = start(&db, &observers(&exchange, ""))
        .await
        .expect_err("no such exchange");
    let message = error.to_string();
    assert!(
        message.contains("observers.orders.actions[0]")
            && message.contains(&format!("exchange '{exchange}' does not exist")),
        "{message}"
    );

    // With `exchange_type`, the start declares it (durable).
    let (stop, engine) = start(&db, &observers(&exchange, "exchange_type = \"topic\""))
        .await
        .unwrap();
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the exchange exists now");
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_message_no_queue_takes_is_a_retryable_failure() {
    let topology = Topology::new(None).await;
    let action = rabbitmq_action(&format!(
        r#"exchange = "{}"
           routing_key = "orders.{{{{ data.id }}}}"
           body_template = '{{"id": {{{{ data.id }}}}}}'"#,
        topology.exchange
    ));
    action.prepare().await.unwrap();
    let event = order_event(EventKind::Created, None, Some(json!({"id": 7})));
    // No queue is bound yet: the message comes back, and the attempt is retryable.
    let error = run(&action, &event, 1).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Transient, "{error}");
    assert!(error.message().contains("no queue is bound"), "{error}");
    topology.bind("orders.*").await;
    run(&action, &event, 2).await.unwrap();
    let (routing_key, properties, data) = eventually(Duration::from_secs(5), "the message", || {
        let topology = &topology;
        async move { topology.get().await }
    })
    .await;
    assert_eq!(routing_key, "orders.7");
    assert_eq!(
        serde_json::from_slice::<Value>(&data).unwrap(),
        json!({"id": 7})
    );
    assert_eq!(*properties.delivery_mode(), Some(2));
    // A publish to an exchange that is gone fails retryably too, and the shared channel is
    // opened again for the next attempt.
    topology
        .channel
        .exchange_delete(
            topology.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let error = run(&action, &event, 3).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Transient, "{error}");
    topology
        .channel
        .exchange_declare(
            topology.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    topology.bind("orders.*").await;
    run(&action, &event, 4).await.unwrap();
    topology.delete().await;
}
