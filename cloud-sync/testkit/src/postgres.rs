//! A throwaway PostgreSQL database per test, on the server named by
//! `FOGLINE_TEST_PG` (an admin URL; `scripts/test.sh` sets it, starting a
//! private server on a free port where none answers) or else the local
//! service at `postgres://postgres@127.0.0.1:5432/postgres`. The database
//! is dropped when the value is.

use tokio_postgres::NoTls;

/// The admin URL tests use.
pub fn admin_url() -> String {
    std::env::var("FOGLINE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test.
#[derive(Debug)]
pub struct TestDb {
    /// Its URL.
    pub url: String,
    name: String,
    admin: String,
}

/// No PostgreSQL to test against.
#[derive(Debug)]
pub struct NoServer(pub String);

impl std::fmt::Display for NoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no PostgreSQL for the tests at {} ({}): run them with scripts/test.sh, which starts a private server where none answers, or set FOGLINE_TEST_PG to an admin URL",
            admin_url(),
            self.0
        )
    }
}

impl std::error::Error for NoServer {}

async fn admin(url: &str) -> Result<tokio_postgres::Client, NoServer> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| NoServer(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl TestDb {
    /// Creates an empty database with a fresh name.
    pub async fn create() -> Result<Self, NoServer> {
        let admin_url = admin_url();
        let client = admin(&admin_url).await?;
        let name = format!(
            "fogline_test_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| NoServer(e.to_string()))?;
        let url = url_for(&admin_url, &name);
        Ok(Self {
            url,
            name,
            admin: admin_url,
        })
    }

    /// A connection of the test's own (to pause an aggregator mid-apply by
    /// holding a row lock, say).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, NoServer> {
        admin(&self.url).await
    }
}

/// `admin` with its database replaced by `db`.
fn url_for(admin: &str, db: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin.clone(), self.name.clone());
        // Dropped from inside or outside a runtime: on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(c) = admin(&admin_url).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::url_for;

    #[test]
    fn the_database_is_swapped_in_the_url() {
        assert_eq!(
            url_for("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            url_for("postgres://u:p@h:1/x?sslmode=disable", "t2"),
            "postgres://u:p@h:1/t2?sslmode=disable"
        );
        assert_eq!(url_for("postgres://h", "t3"), "postgres://h/t3");
    }
}
