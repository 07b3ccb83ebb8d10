//! Numbered, embedded migrations: the shape both stores share.
//!
//! Each store embeds its own `migrations/NNNN_name.sql` files (the SQL differs), records the
//! versions it applied in a `dray_schema_version` table, and refuses a database whose schema is
//! newer than it knows. Running the migrations again changes nothing.

use crate::error::{Error, Result};

/// One migration: a version number, a name, and the SQL that takes the schema from
/// `version - 1` to `version`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// 1, 2, 3, … with no gaps.
    pub version: i64,
    /// Short description (the file name without number and extension).
    pub name: &'static str,
    /// The statements to run, in one transaction.
    pub sql: &'static str,
}

/// The newest version in `migrations`.
pub fn latest(migrations: &[Migration]) -> i64 {
    migrations.last().map_or(0, |m| m.version)
}

/// The migrations to apply to a database at version `found`, refusing a newer schema.
pub fn pending(migrations: &[Migration], found: i64) -> Result<&[Migration]> {
    let supported = latest(migrations);
    if found > supported {
        return Err(Error::SchemaTooNew { found, supported });
    }
    let start = migrations
        .iter()
        .position(|m| m.version > found)
        .unwrap_or(migrations.len());
    Ok(&migrations[start..])
}

/// Checks that a database at `found` can be used by this build without migrating.
pub fn check(migrations: &[Migration], found: i64) -> Result<()> {
    let supported = latest(migrations);
    if found > supported {
        Err(Error::SchemaTooNew { found, supported })
    } else if found < supported {
        Err(Error::SchemaOutdated {
            found,
            required: supported,
        })
    } else {
        Ok(())
    }
}

/// When a store opens, what it does about the schema.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SchemaMode {
    /// Apply pending migrations (the SQLite default: zero setup).
    Migrate,
    /// Refuse to open unless the schema is exactly this build's (the PostgreSQL default:
    /// migrations are an operator's step, `dray migrate`).
    #[default]
    Check,
    /// Do nothing (for `dray migrate` itself, and tools that inspect old schemas).
    Skip,
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &[Migration] = &[
        Migration {
            version: 1,
            name: "a",
            sql: "",
        },
        Migration {
            version: 2,
            name: "b",
            sql: "",
        },
    ];

    #[test]
    fn pending_and_check() {
        assert_eq!(pending(M, 0).unwrap().len(), 2);
        assert_eq!(pending(M, 1).unwrap()[0].version, 2);
        assert!(pending(M, 2).unwrap().is_empty());
        assert!(matches!(
            pending(M, 3),
            Err(Error::SchemaTooNew {
                found: 3,
                supported: 2
            })
        ));
        assert!(matches!(
            check(M, 1),
            Err(Error::SchemaOutdated {
                found: 1,
                required: 2
            })
        ));
        assert!(check(M, 2).is_ok());
    }
}
