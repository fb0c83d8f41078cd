//! Order storage on SQLite (WAL, shared by several instances) or PostgreSQL, with idempotency keys held by a
//! unique constraint in the database itself, so they hold across instances and restarts.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::orders::{NewOrder, Order};
use crate::pool::Pool;

/// How long a SQLite writer waits for the write lock held by another connection or instance.
pub const SQLITE_BUSY_TIMEOUT_MS: u64 = 10_000;

/// Where orders are stored, parsed from `--db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DbUrl {
    pub fn parse(raw: &str) -> Result<DbUrl, StoreError> {
        if let Some(path) = raw.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::BadUrl(format!(
                    "{raw:?}: sqlite:// needs a file path, e.g. sqlite://orders.db"
                )));
            }
            Ok(DbUrl::Sqlite(PathBuf::from(path)))
        } else if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            raw.parse::<tokio_postgres::Config>().map_err(|e| StoreError::BadUrl(format!("{raw:?}: {e}")))?;
            Ok(DbUrl::Postgres(raw.to_string()))
        } else {
            Err(StoreError::BadUrl(format!("{raw:?}: expected sqlite://PATH or postgres://USER@HOST/DB")))
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DbUrl::Sqlite(_) => "sqlite",
            DbUrl::Postgres(_) => "postgres",
        }
    }
}

/// A storage failure, classified so that the HTTP layer can tell the client whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad database URL {0}")]
    BadUrl(String),
    /// Another writer held the lock too long. Retryable.
    #[error("database busy: {0}")]
    Busy(String),
    /// The database could not be reached. Retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

impl StoreError {
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Busy(_) | StoreError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode::{CannotOpen, DatabaseBusy, DatabaseLocked};
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Busy(e.to_string()),
            Some(CannotOpen) => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Other(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        if e.as_db_error().is_some() {
            StoreError::Other(e.to_string())
        } else {
            StoreError::Unavailable(e.to_string())
        }
    }
}

/// The outcome of creating an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new row was written.
    New(Order),
    /// The idempotency key was seen before with the same body: the first order, unchanged.
    Replayed(Order),
    /// The idempotency key was seen before with a different body.
    KeyConflict(Order),
}

/// Who writes the order: recorded in each row.
#[derive(Debug, Clone)]
pub struct Writer {
    pub instance: String,
    pub version: String,
}

pub struct Store {
    url: DbUrl,
    backend: Backend,
}

enum Backend {
    Sqlite(Pool<rusqlite::Connection>),
    Postgres(Pool<tokio_postgres::Client>),
}

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item TEXT NOT NULL,
    qty INTEGER NOT NULL CHECK (qty > 0),
    instance TEXT NOT NULL,
    version TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at_ms INTEGER NOT NULL
)";

const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (
    id BIGSERIAL PRIMARY KEY,
    item TEXT NOT NULL,
    qty BIGINT NOT NULL CHECK (qty > 0),
    instance TEXT NOT NULL,
    version TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at_ms BIGINT NOT NULL
)";

/// An arbitrary constant that serialises concurrent schema creation by several instances on PostgreSQL.
const POSTGRES_SCHEMA_LOCK: i64 = 0x006e_6f6e_7374_6f70;

const COLUMNS: &str = "id, item, qty, instance, version, created_at_ms";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens the database, creating the schema, with at most `connections_max` connections.
    pub async fn open(url: DbUrl, connections_max: usize) -> Result<Store, StoreError> {
        let backend = match &url {
            DbUrl::Sqlite(path) => {
                let path = path.clone();
                let conn = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                    // Instances that start together race to switch a new file to WAL and create the schema;
                    // SQLite answers that race with SQLITE_BUSY at once (no busy handler), so try again.
                    let give_up = std::time::Instant::now() + Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS);
                    loop {
                        let opened = open_sqlite(&path).and_then(|conn| {
                            conn.execute_batch(SQLITE_SCHEMA)?;
                            Ok(conn)
                        });
                        match opened {
                            Err(StoreError::Busy(_)) if std::time::Instant::now() < give_up => {
                                std::thread::sleep(Duration::from_millis(20 + fastrand::u64(..30)));
                            }
                            other => return other,
                        }
                    }
                })
                .await
                .map_err(|e| StoreError::Other(e.to_string()))??;
                let pool = Pool::new(connections_max);
                pool.slot().await.give_back(conn);
                Backend::Sqlite(pool)
            }
            DbUrl::Postgres(raw) => {
                let client = connect_postgres(raw).await?;
                client.execute("SELECT pg_advisory_lock($1)", &[&POSTGRES_SCHEMA_LOCK]).await?;
                let created = client.batch_execute(POSTGRES_SCHEMA).await;
                client.execute("SELECT pg_advisory_unlock($1)", &[&POSTGRES_SCHEMA_LOCK]).await?;
                created?;
                let pool = Pool::new(connections_max);
                pool.slot().await.give_back(client);
                Backend::Postgres(pool)
            }
        };
        Ok(Store { url, backend })
    }

    pub fn url(&self) -> &DbUrl {
        &self.url
    }

    /// Writes an order, or with an idempotency key seen before, returns the first order written under it.
    pub async fn create(&self, order: NewOrder, key: Option<String>, by: &Writer) -> Result<Created, StoreError> {
        let (instance, version, at) = (by.instance.clone(), by.version.clone(), now_ms());
        let insert = format!(
            "INSERT INTO orders (item, qty, instance, version, idempotency_key, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING RETURNING {COLUMNS}"
        );
        let select = format!("SELECT {COLUMNS} FROM orders WHERE idempotency_key = $1");
        let (inserted, existing) = match &self.backend {
            Backend::Sqlite(pool) => {
                let order = order.clone();
                self.sqlite(pool, move |c| {
                    let params = rusqlite::params![order.item, order.qty, instance, version, key, at];
                    let inserted = c.prepare_cached(&insert)?.query_map(params, sqlite_order)?.next().transpose()?;
                    let existing = match (&inserted, &key) {
                        (None, Some(k)) => c.prepare_cached(&select)?.query_row([k], sqlite_order).map(Some)?,
                        _ => None,
                    };
                    Ok((inserted, existing))
                })
                .await?
            }
            Backend::Postgres(pool) => {
                let new = order.clone();
                self.postgres(pool, |c| async move {
                    let rows = c.query(&insert, &[&new.item, &new.qty, &instance, &version, &key, &at]).await?;
                    let inserted = rows.first().map(pg_order);
                    let existing = match (&inserted, &key) {
                        (None, Some(k)) => Some(pg_order(&c.query_one(&select, &[k]).await?)),
                        _ => None,
                    };
                    Ok((c, (inserted, existing)))
                })
                .await?
            }
        };
        Ok(match (inserted, existing) {
            (Some(new), _) => Created::New(new),
            (None, Some(first)) if first.item == order.item && first.qty == order.qty => Created::Replayed(first),
            (None, Some(first)) => Created::KeyConflict(first),
            (None, None) => return Err(StoreError::Other("insert returned no row and no key to look up".into())),
        })
    }

    pub async fn get(&self, id: i64) -> Result<Option<Order>, StoreError> {
        let select = format!("SELECT {COLUMNS} FROM orders WHERE id = $1");
        match &self.backend {
            Backend::Sqlite(pool) => {
                self.sqlite(pool, move |c| {
                    Ok(c.prepare_cached(&select)?.query_map([id], sqlite_order)?.next().transpose()?)
                })
                .await
            }
            Backend::Postgres(pool) => {
                self.postgres(pool, |c| async move {
                    let row = c.query_opt(&select, &[&id]).await?;
                    Ok((c, row.as_ref().map(pg_order)))
                })
                .await
            }
        }
    }

    pub async fn count(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM orders";
        match &self.backend {
            Backend::Sqlite(pool) => self.sqlite(pool, |c| Ok(c.query_row(SQL, [], |r| r.get(0))?)).await,
            Backend::Postgres(pool) => {
                self.postgres(pool, |c| async move {
                    let n: i64 = c.query_one(SQL, &[]).await?.get(0);
                    Ok((c, n))
                })
                .await
            }
        }
    }

    async fn sqlite<R: Send + 'static>(
        &self,
        pool: &Pool<rusqlite::Connection>,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let DbUrl::Sqlite(path) = &self.url else { unreachable!("sqlite pool with a postgres URL") };
        let mut slot = pool.slot().await;
        let conn = slot.conn.take();
        let path = path.clone();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => match open_sqlite(&path) {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            let result = f(&mut conn);
            (Some(conn), result)
        })
        .await
        .map_err(|e| StoreError::Other(format!("database task failed: {e}")))?;
        if let Some(conn) = conn {
            slot.give_back(conn);
        }
        result
    }

    async fn postgres<R, F, Fut>(&self, pool: &Pool<tokio_postgres::Client>, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: std::future::Future<Output = Result<(tokio_postgres::Client, R), StoreError>>,
    {
        let DbUrl::Postgres(raw) = &self.url else { unreachable!("postgres pool with a sqlite URL") };
        let mut slot = pool.slot().await;
        let client = match slot.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => connect_postgres(raw).await?,
        };
        // A client whose call failed is dropped rather than returned: the next caller reconnects if needed.
        let (client, value) = f(client).await?;
        slot.give_back(client);
        Ok(value)
    }
}

fn open_sqlite(path: &std::path::Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))?;
    // WAL lets readers run beside the one writer and several instances share the file; FULL syncs the WAL on
    // every commit, so a 201 means the row survives a crash of the process or of the machine.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

async fn connect_postgres(raw: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(raw, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

fn sqlite_order(r: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: r.get(0)?,
        item: r.get(1)?,
        qty: r.get(2)?,
        instance: r.get(3)?,
        version: r.get(4)?,
        created_at_ms: r.get(5)?,
    })
}

fn pg_order(r: &tokio_postgres::Row) -> Order {
    Order {
        id: r.get(0),
        item: r.get(1),
        qty: r.get(2),
        instance: r.get(3),
        version: r.get(4),
        created_at_ms: r.get(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(DbUrl::parse("sqlite://a/b.db").unwrap(), DbUrl::Sqlite("a/b.db".into()));
        assert_eq!(DbUrl::parse("postgres://root@127.0.0.1/test").unwrap().kind(), "postgres");
        assert!(DbUrl::parse("sqlite://").is_err());
        assert!(DbUrl::parse("mysql://x").is_err());
    }

    #[tokio::test]
    async fn idempotent_create_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("nonstop-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("unit.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(DbUrl::Sqlite(path), 2).await.unwrap();
        let by = Writer { instance: "i".into(), version: "v1".into() };
        let order = NewOrder { item: "book".into(), qty: 2 };
        let Created::New(first) = store.create(order.clone(), Some("k1".into()), &by).await.unwrap() else {
            panic!("first create must write")
        };
        assert_eq!(
            store.create(order.clone(), Some("k1".into()), &by).await.unwrap(),
            Created::Replayed(first.clone())
        );
        let other = NewOrder { item: "pen".into(), qty: 2 };
        assert_eq!(store.create(other, Some("k1".into()), &by).await.unwrap(), Created::KeyConflict(first.clone()));
        assert!(matches!(store.create(order, None, &by).await.unwrap(), Created::New(_)));
        assert_eq!(store.count().await.unwrap(), 2);
        assert_eq!(store.get(first.id).await.unwrap(), Some(first));
        assert_eq!(store.get(999).await.unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
