//! What the HTTP, observability and trace tests share: the PostgreSQL URL and a macro that runs
//! each scenario on a fresh SQLite file and in a fresh PostgreSQL schema.

#![allow(dead_code)]

/// Stores a token named `name` with `scopes`; returns its secret.
pub async fn token<S: dray::api::ApiStore>(
    store: &S,
    name: &str,
    scopes: &[dray::api::Scope],
) -> String {
    let (secret, hash) = dray::api::generate_token().unwrap();
    store
        .token_insert(&dray::api::NewToken {
            id: uuid::Uuid::now_v7(),
            name: name.to_owned(),
            scopes: scopes.to_vec(),
            hash,
            ttl: None,
        })
        .await
        .unwrap();
    secret
}

/// The PostgreSQL the tests use (`DRAY_TEST_DATABASE_URL`, default the local server).
pub fn pg_url() -> String {
    std::env::var("DRAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs `scenario` on a store in a new PostgreSQL schema, then drops the schema.
pub async fn on_postgres<F, Fut>(scenario: F)
where
    F: FnOnce(dray::PgStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let schema = format!("dray_h_{}", uuid::Uuid::now_v7().simple());
    let store = dray::PgStore::builder(pg_url())
        .schema(&schema)
        .max_connections(8)
        .schema_mode(dray::SchemaMode::Migrate)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required for these tests: {e}"));
    scenario(store.clone()).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await;
}

/// Runs `scenario` on a store in a new SQLite file.
pub async fn on_sqlite<F, Fut>(scenario: F)
where
    F: FnOnce(dray::SqliteStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = dray::SqliteStore::open(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    scenario(store).await;
}

/// One test per scenario and store, in modules `sqlite` and `postgres`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::common::on_sqlite(super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::common::on_postgres(super::$name).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_stores;
