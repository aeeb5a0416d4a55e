//! The benchmark's databases and data: FraiseQL-style `tb_user` / `tb_order` tables (20 columns,
//! about 1 KB as JSON per order), rows derived from a seed number so that the backlog (set-based
//! `generate_series`) and the paced writer (one row per statement) write the same kind of rows.
//!
//! Invariant: every database this module creates is named `fo_bench_*` and is dropped (with
//! `FORCE`) before it is created again, so each run starts from an empty database.

use tokio_postgres::{Client, NoTls};

pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn admin_url() -> String {
    std::env::var("FRAISEQL_BENCH_ADMIN_URL").unwrap_or_else(|_| ADMIN_URL.to_string())
}

/// The URL of database `name` on the admin URL's server.
pub fn url_of(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Drop and create database `name`; returns its URL.
pub async fn recreate(name: &str) -> String {
    let admin = connect(&admin_url()).await;
    // Two statements: CREATE DATABASE cannot run in the implicit transaction of a batch.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    url_of(name)
}

pub async fn drop_database(name: &str) {
    let admin = connect(&admin_url()).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

pub const SCHEMA: &str = "
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE tb_user (
    pk_user INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id UUID NOT NULL UNIQUE,
    fk_customer_org UUID NOT NULL,
    email TEXT NOT NULL,
    first_name TEXT,
    last_name TEXT,
    display_name TEXT,
    password_hash TEXT,
    locale TEXT,
    timezone TEXT,
    phone TEXT,
    role TEXT NOT NULL,
    is_active BOOLEAN NOT NULL,
    email_verified BOOLEAN NOT NULL,
    preferences JSONB NOT NULL,
    address JSONB NOT NULL,
    bio TEXT,
    last_login_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE tb_order (
    pk_order INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id UUID NOT NULL UNIQUE,
    fk_customer_org UUID NOT NULL,
    fk_user UUID NOT NULL,
    order_number TEXT NOT NULL,
    status TEXT NOT NULL,
    total NUMERIC(12,2) NOT NULL,
    currency TEXT NOT NULL,
    region TEXT NOT NULL,
    priority TEXT NOT NULL,
    customer_email TEXT NOT NULL,
    customer_name TEXT NOT NULL,
    shipping_address JSONB NOT NULL,
    billing_address JSONB NOT NULL,
    items JSONB NOT NULL,
    coupon_code TEXT,
    notes TEXT,
    version INTEGER NOT NULL DEFAULT 1,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

/// Columns of `tb_order` that [`ORDER_VALUES`] fills, in its order.
pub const ORDER_COLUMNS: &str = "id, fk_customer_org, fk_user, order_number, status, total, currency, region, \
     priority, customer_email, customer_name, shipping_address, billing_address, items, coupon_code, notes";

/// The values of one order from seed `g` (an integer expression) and id `i` (a uuid expression).
pub fn order_values(g: &str, id: &str) -> String {
    format!(
        "{id},
         ('aaaaaaaa-0000-0000-0000-00000000000' || ({g} % 4))::uuid,
         md5('user' || ({g} % 5000))::uuid,
         'ORD-' || lpad({g}::text, 10, '0'),
         (ARRAY['new','paid','shipped','delivered','cancelled'])[1 + {g} % 5],
         (({g}::bigint * 7919) % 100000) / 100.0,
         (ARRAY['EUR','USD','GBP'])[1 + {g} % 3],
         (ARRAY['eu','us','apac','latam'])[1 + ({g} / 7) % 4],
         CASE WHEN {g} % 5 = 0 THEN 'high' ELSE 'normal' END,
         'customer' || {g} || CASE WHEN {g} % 5 IN (1, 2) THEN '@Example.com' ELSE '@mail.test' END,
         'Customer Number ' || {g} || ' Longname',
         jsonb_build_object('street', {g} || ' Rue de la Longue Avenue', 'city',
             (ARRAY['Paris','Berlin','Austin','Tokyo','Lima'])[1 + {g} % 5], 'zip',
             lpad(({g} % 100000)::text, 5, '0'), 'country', (ARRAY['FR','DE','US','JP','PE'])[1 + {g} % 5]),
         jsonb_build_object('street', {g} || ' Billing Boulevard', 'city', 'Lyon', 'zip', '69001',
             'country', 'FR', 'vat_id', 'FR' || lpad({g}::text, 11, '0')),
         jsonb_build_array(
             jsonb_build_object('sku', 'BOOK-' || ({g} % 997), 'name', 'A book about things', 'qty', 1 + {g} % 3, 'price', 12.5),
             jsonb_build_object('sku', 'PEN-' || ({g} % 89), 'name', 'A blue pen', 'qty', 2, 'price', 1.2),
             jsonb_build_object('sku', 'BAG-' || ({g} % 13), 'name', 'A canvas bag', 'qty', 1, 'price', 8.9)),
         CASE WHEN {g} % 10 = 3 THEN 'SPRING' || ({g} % 100) END,
         'Please leave the parcel with the concierge if nobody answers. Fragile items inside, '
             || 'handle with care. Gift wrap requested; include the card with the message '
             || 'happy birthday and the order number ' || {g} || ' on the invoice, thanks.'"
    )
}

/// Columns of `tb_user` that [`user_values`] fills, in its order.
pub const USER_COLUMNS: &str = "id, fk_customer_org, email, first_name, last_name, display_name, password_hash, \
     locale, timezone, phone, role, is_active, email_verified, preferences, address, bio, last_login_at";

pub fn user_values(g: &str, id: &str) -> String {
    format!(
        "{id},
         ('aaaaaaaa-0000-0000-0000-00000000000' || ({g} % 4))::uuid,
         'user' || {g} || '@example.com',
         'Firstname' || {g}, 'Lastname' || {g}, 'Firstname' || {g} || ' L.',
         '$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$' || md5({g}::text),
         (ARRAY['fr-FR','en-US','de-DE'])[1 + {g} % 3], 'Europe/Paris', '+33 6 00 00 ' || lpad(({g} % 10000)::text, 4, '0'),
         CASE WHEN {g} % 50 = 0 THEN 'admin' ELSE 'member' END,
         {g} % 10 <> 0, {g} % 3 = 0,
         jsonb_build_object('newsletter', {g} % 2 = 0, 'theme', 'dark', 'notifications',
             jsonb_build_object('email', true, 'sms', false, 'push', true)),
         jsonb_build_object('street', {g} || ' Avenue des Champs', 'city', 'Paris', 'zip', '75008', 'country', 'FR'),
         'Likes long walks, short queues and reliable webhooks. Member since the early days; '
             || 'prefers contact by email in the morning.',
         now() - ({g} % 1000) * interval '1 minute'"
    )
}

/// Create the tables (no capture).
pub async fn create_tables(client: &Client) {
    client
        .batch_execute(SCHEMA)
        .await
        .unwrap_or_else(|e| panic!("bench schema: {e:?}"));
}

/// Capture both tables with the real trigger (`capture::enable`).
pub async fn enable_capture(client: &Client) {
    use fraiseql_observers::capture::{self, CaptureSpec};
    let mut user = CaptureSpec::new("tb_user", "User");
    user.tenant_column = Some("fk_customer_org".into());
    user.exclude_columns = vec!["password_hash".into()];
    capture::enable(client, &user)
        .await
        .expect("capture tb_user");
    let mut order = CaptureSpec::new("tb_order", "Order");
    order.tenant_column = Some("fk_customer_org".into());
    capture::enable(client, &order)
        .await
        .expect("capture tb_order");
}

/// How many changes of each kind a backlog holds.
#[derive(Debug, Clone, Copy)]
pub struct BacklogShape {
    pub users: i64,
    pub orders: i64,
    pub order_updates: i64,
}

impl BacklogShape {
    /// 10% user inserts, 60% order inserts, 30% order updates.
    pub fn of(total: i64) -> BacklogShape {
        BacklogShape {
            users: total / 10,
            orders: total * 6 / 10,
            order_updates: total - total / 10 - total * 6 / 10,
        }
    }

    pub fn total(&self) -> i64 {
        self.users + self.orders + self.order_updates
    }
}

/// Write a backlog: users, then orders, then updates of the first orders, in committed
/// statements of `per_statement` rows (each its own transaction).
pub async fn fill(client: &Client, shape: BacklogShape, per_statement: i64) {
    let mut g = 1;
    while g <= shape.users {
        let to = (g + per_statement - 1).min(shape.users);
        client
            .batch_execute(&format!(
                "INSERT INTO tb_user ({USER_COLUMNS}) SELECT {} FROM generate_series({g}, {to}) g",
                user_values("g", "gen_random_uuid()")
            ))
            .await
            .expect("fill users");
        g = to + 1;
    }
    let mut g = 1;
    while g <= shape.orders {
        let to = (g + per_statement - 1).min(shape.orders);
        client
            .batch_execute(&format!(
                "INSERT INTO tb_order ({ORDER_COLUMNS}) SELECT {} FROM generate_series({g}, {to}) g",
                order_values("g", "gen_random_uuid()")
            ))
            .await
            .expect("fill orders");
        g = to + 1;
    }
    let (first, last) = first_order(client).await;
    let updates = shape.order_updates.min(last - first + 1);
    let mut k = 0;
    while k < updates {
        let n = per_statement.min(updates - k);
        client
            .batch_execute(&format!(
                "UPDATE tb_order SET
                     status = CASE WHEN pk_order % 2 = 0
                                   THEN (ARRAY['paid','shipped','delivered','cancelled','new'])[1 + pk_order % 5]
                                   ELSE status END,
                     version = version + 1, updated_at = now()
                  WHERE pk_order >= {} AND pk_order < {}",
                first + k,
                first + k + n
            ))
            .await
            .expect("update orders");
        k += n;
    }
}

async fn first_order(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT coalesce(min(pk_order), 0)::int8, coalesce(max(pk_order), -1)::int8 FROM tb_order",
            &[],
        )
        .await
        .expect("order range");
    (row.get(0), row.get(1))
}

/// The single-row insert the paced writer and pgbench run: `$1` the seed, `$2` the id.
pub fn single_order_insert() -> String {
    format!(
        "INSERT INTO tb_order ({ORDER_COLUMNS}) SELECT {} FROM (SELECT $1::int AS g) s",
        order_values("s.g", "$2::uuid")
    )
}

/// Size of an order's JSON image, for the record.
pub async fn order_json_bytes(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(avg(octet_length(to_jsonb(o)::text)), 0)::int8 FROM (SELECT * FROM tb_order LIMIT 1000) o",
            &[],
        )
        .await
        .expect("row size")
        .get(0)
}
