"""The shared PostgreSQL taken over by an owner account (``e2m-proxy db init|upgrade
--owner-url``): every table, sequence, the schema and the database become the owner's,
the nodes' account (``[cluster] db_url``'s user) is granted only what a node does, and
the take-over refuses a database holding anything the owner cannot vouch for (objects
of other kinds, row level security, grants the nodes' account can use, code outside
``pg_catalog``, tables not as the project's own DDL makes them).

Reviews 73, 74, 76, 78, 80 and 87 each found a way the nodes' account could still
rewrite or hide archived history; the comments name the review a check answers.
(Moved here from ``db_cmd``, which keeps the command line; the tests' docstrings
name the old places, ``db_cmd._grant`` and the like.)
"""

from __future__ import annotations

from typing import Any

from .config import AppConfig

__all__ = ["TakeOverError", "as_owner", "grant_nodes"]


class TakeOverError(Exception):
    """The take-over was refused or failed; the text says what to do."""


# What a node does in the shared database, and no more (review 73: the nodes' account
# owned the tables, so its password let anyone rewrite or delete archived history).
_NODE_GRANTS = (
    ("SELECT", ("schema_version", "version")),            # version: Kamailio's own
    ("SELECT, INSERT", ("bodies", "media")),
    ("UPDATE (from_uri, request_uri)", ("bodies",)),      # a copy fills what a row lacks
    ("SELECT, INSERT, UPDATE, DELETE", ("replay_claims", "cert_publications",
                                        "cert_subscriptions")),
)


def as_owner(config: AppConfig, owner: Any) -> AppConfig:
    """``config`` with the shared database reached as ``owner`` (and the users' table
    too when it is in that same database)."""
    from dataclasses import replace
    same = config.auth is not None and config.auth.pg is not None and \
        (config.auth.pg.host, config.auth.pg.port, config.auth.pg.database) == \
        (config.cluster.db.host, config.cluster.db.port, config.cluster.db.database)
    return replace(config, cluster=replace(config.cluster, db=owner),
                   auth=replace(config.auth, pg=owner) if same else config.auth)


# A copy of a message fills a row's empty sender or Request-URI; the nodes' account may
# do that and nothing else to a row (review 74: its column grant let it rewrite them).
_FILL_ONLY = """
CREATE OR REPLACE FUNCTION e2m_bodies_fill_only() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF (OLD.from_uri IS NOT NULL AND NEW.from_uri IS DISTINCT FROM OLD.from_uri)
       OR (OLD.request_uri IS NOT NULL AND NEW.request_uri IS DISTINCT FROM OLD.request_uri)
    THEN
        RAISE EXCEPTION 'e2m archive: a recorded sender or Request-URI cannot change';
    END IF;
    RETURN NEW;
END
$f$"""
_FILL_TRIGGER = ("CREATE OR REPLACE TRIGGER e2m_bodies_fill_only BEFORE UPDATE ON bodies "
                 "FOR EACH ROW EXECUTE FUNCTION e2m_bodies_fill_only()")


# Every table and sequence of the schema, with its owner; and the database and schema
# themselves: the owner of either may drop anything in it, triggers included (review 76)
_OWNERS = ("SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
           "JOIN pg_namespace n ON n.oid = c.relnamespace "
           "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'S')")
_PLACES = ("SELECT 'database ' || datname, pg_get_userbyid(datdba) FROM pg_database "
           "WHERE datname = current_database() UNION ALL "
           "SELECT 'schema ' || nspname, pg_get_userbyid(nspowner) FROM pg_namespace "
           "WHERE nspname = current_schema()")


# Any other schema the nodes' account owns: made before the take-over (the database
# was its own), it could hold tables of the archive's names.  Every client searches
# only the tables' schema (pgconn.SEARCH_PATH_OPTION); the operator still hears of it,
# as it is not the owner's to vouch for (review 78).
_NODE_SCHEMAS = ("SELECT nspname FROM pg_namespace "
                 "WHERE nspowner = (SELECT oid FROM pg_roles WHERE rolname = %s)")


# Our trigger function, by OID (an overload of its name is not ours: review 87).
_OURS = "to_regprocedure(quote_ident(current_schema()) || '.e2m_bodies_fill_only()')"


# Code the nodes' account could have left on the tables while they were its own, which
# a change of owner keeps running: a trigger or rule on them, a function in the schema
# (a REASSIGN makes its function the owner's), anything else it still owns (review 80).
_PLANTED = (
    "SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass FROM pg_trigger "
    # ours only: on bodies, calling our function (a name alone was exempt: review 87)
    "WHERE NOT tgisinternal AND NOT (tgname = 'e2m_bodies_fill_only' "
    "AND tgrelid = to_regclass(quote_ident(current_schema()) || '.bodies') "
    "AND tgfoid = " + _OURS + ") "
    "AND tgrelid IN (SELECT c.oid FROM pg_class c WHERE c.relnamespace = "
    "current_schema()::regnamespace) "
    "UNION ALL SELECT 'rule ' || rulename || ' on ' || ev_class::regclass FROM pg_rewrite "
    "WHERE rulename <> '_RETURN' AND ev_class IN (SELECT c.oid FROM pg_class c "
    "WHERE c.relnamespace = current_schema()::regnamespace) "
    "UNION ALL SELECT 'policy ' || polname || ' on ' || polrelid::regclass FROM pg_policy "
    "WHERE polrelid IN (SELECT c.oid FROM pg_class c WHERE c.relnamespace = "
    "current_schema()::regnamespace) "
    "UNION ALL SELECT 'function ' || p.oid::regprocedure FROM pg_proc p "
    "WHERE p.pronamespace = current_schema()::regnamespace "
    "AND p.oid IS DISTINCT FROM " + _OURS + " "
    # an extension's own functions are the extension's (a trigger using one is caught)
    "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass "
    "AND d.objid = p.oid AND d.deptype = 'e') "
    "UNION ALL SELECT pg_describe_object(classid, objid, objsubid) FROM pg_shdepend "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND refclassid = 'pg_authid'::regclass AND deptype = 'o' "
    "AND refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)")


# What a change of owner keeps and the checks above never read (review 87): grants to
# PUBLIC (or to a role the nodes' account is in), relations no take-over reaches, row
# level security, code in another schema, constraints and indexes e2m-proxy never made.
_SCHEMA_RELS = ("SELECT c.oid FROM pg_class c "
                "WHERE c.relnamespace = current_schema()::regnamespace")

# A view runs as its owner, a foreign or partitioned table is not taken over: refused.
_KINDS = ("SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view ' "
          "WHEN 'f' THEN 'foreign table ' WHEN 'p' THEN 'partitioned table ' "
          "WHEN 'c' THEN 'composite type ' ELSE 'relation ' END || c.oid::regclass "
          "FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace "
          "AND c.relkind NOT IN ('r', 'S', 'i')")

# With no policy it hides every row from the nodes and refuses their inserts.
_RLS = ("SELECT 'row level security on ' || c.oid::regclass FROM pg_class c "
        "WHERE c.relnamespace = current_schema()::regnamespace "
        "AND (c.relrowsecurity OR c.relforcerowsecurity)")

# Grants the nodes' account can use (to PUBLIC, itself or a role it is in) beyond the
# ones _grant just made (by the owner, without grant option); on the schema and the
# database, CREATE only.  %(node)s is the nodes' role.
_ACL_WHO = "CASE WHEN e.grantee = 0 THEN true ELSE pg_has_role(%(node)s, e.grantee, 'MEMBER') END"
_ACLS = (
    "SELECT CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(e.grantee) END "
    "|| ' may ' || e.privilege_type || ' on ' || x.what FROM ("
    "SELECT c.oid::regclass::text AS what, c.relowner AS owner, c.relacl AS acl "
    "FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace "
    "UNION ALL SELECT c.oid::regclass || ' (' || quote_ident(a.attname) || ')', "
    "c.relowner, a.attacl FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "WHERE c.relnamespace = current_schema()::regnamespace AND NOT a.attisdropped "
    "AND a.attacl IS NOT NULL) x, aclexplode(x.acl) e "
    "WHERE e.grantee <> x.owner AND " + _ACL_WHO + " AND NOT (e.grantee = "
    "(SELECT oid FROM pg_roles WHERE rolname = %(node)s) AND e.grantor = x.owner "
    "AND NOT e.is_grantable) "
    "UNION ALL SELECT CASE WHEN e.grantee = 0 THEN 'PUBLIC' "
    "ELSE pg_get_userbyid(e.grantee) END || ' may CREATE in ' || x.what FROM ("
    "SELECT 'schema ' || quote_ident(nspname) AS what, nspacl AS acl FROM pg_namespace "
    "WHERE oid = current_schema()::regnamespace UNION ALL "
    "SELECT 'database ' || quote_ident(datname), datacl FROM pg_database "
    "WHERE datname = current_database()) x, aclexplode(x.acl) e "
    "WHERE e.privilege_type = 'CREATE' AND " + _ACL_WHO + " "
    # the owner's (after REASSIGN) default privileges would give later tables away
    "UNION ALL SELECT 'default privileges of ' || pg_get_userbyid(d.defaclrole) || "
    "' give ' || CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(e.grantee) END "
    "|| ' ' || e.privilege_type FROM pg_default_acl d, aclexplode(d.defaclacl) e "
    "WHERE d.defaclnamespace IN (0, current_schema()::regnamespace) "
    "AND d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = %(owner)s) "
    "AND " + _ACL_WHO)

# Code outside pg_catalog that the schema's relations, or their triggers, constraints,
# defaults, indexes, statistics, policies or rules use: after a REASSIGN it runs as the
# owner (a function, an operator's, a domain's CHECK), wherever it lives.  Ours only is
# exempt, by OID.
_CODE = (
    "WITH t AS (" + _SCHEMA_RELS + "), o (classid, objid) AS ("
    "SELECT 'pg_class'::regclass, oid FROM t "
    "UNION ALL SELECT 'pg_trigger'::regclass, oid FROM pg_trigger "
    "WHERE tgrelid IN (SELECT oid FROM t) "
    "UNION ALL SELECT 'pg_constraint'::regclass, oid FROM pg_constraint "
    "WHERE conrelid IN (SELECT oid FROM t) OR confrelid IN (SELECT oid FROM t) "
    "UNION ALL SELECT 'pg_attrdef'::regclass, oid FROM pg_attrdef "
    "WHERE adrelid IN (SELECT oid FROM t) "
    "UNION ALL SELECT 'pg_class'::regclass, indexrelid FROM pg_index "
    "WHERE indrelid IN (SELECT oid FROM t) "
    "UNION ALL SELECT 'pg_statistic_ext'::regclass, oid FROM pg_statistic_ext "
    "WHERE stxrelid IN (SELECT oid FROM t) "
    "UNION ALL SELECT 'pg_policy'::regclass, oid FROM pg_policy "
    "WHERE polrelid IN (SELECT oid FROM t) "
    "UNION ALL SELECT 'pg_rewrite'::regclass, oid FROM pg_rewrite "
    "WHERE ev_class IN (SELECT oid FROM t)) "
    "SELECT DISTINCT pg_describe_object(o.classid, o.objid, 0) || ' uses ' || "
    "pg_describe_object(d.refclassid, d.refobjid, 0) FROM o JOIN pg_depend d "
    "ON d.classid = o.classid AND d.objid = o.objid WHERE "
    "(d.refclassid = 'pg_proc'::regclass AND d.refobjid IS DISTINCT FROM " + _OURS + " "
    "AND (SELECT pronamespace FROM pg_proc WHERE oid = d.refobjid) <> 'pg_catalog'::regnamespace) "
    "OR (d.refclassid = 'pg_operator'::regclass AND (SELECT oprnamespace FROM pg_operator "
    "WHERE oid = d.refobjid) <> 'pg_catalog'::regnamespace) "
    "OR (d.refclassid = 'pg_type'::regclass AND (SELECT typnamespace FROM pg_type "
    "WHERE oid = d.refobjid) <> 'pg_catalog'::regnamespace) "
    "OR (d.refclassid = 'pg_collation'::regclass AND (SELECT collnamespace FROM pg_collation "
    "WHERE oid = d.refobjid) <> 'pg_catalog'::regnamespace)")


# The tables a node writes, as e2m-proxy's own DDL makes them: anything else on them
# (a CHECK, an index on an expression, a column's type or default, a sequence's limit,
# an unlogged table, a child table) can refuse or lose the nodes' rows (review 87).
# Kamailio's tables (users) are read only by the nodes and come from its own scripts,
# of whichever version: not compared (their code is, by _CODE).
_SHAPE = {
    "constraint": "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                  "WHERE conrelid = %(t)s",
    "referenced by": "SELECT conname || ' of ' || conrelid::regclass, "
                     "pg_get_constraintdef(oid) FROM pg_constraint "
                     "WHERE confrelid = %(t)s AND conrelid <> %(t)s",
    "index": "SELECT quote_ident(c.relname), CASE WHEN i.indisvalid THEN '' ELSE 'INVALID ' "
             "END || pg_get_indexdef(i.indexrelid) FROM pg_index i "
             "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %(t)s",
    "column": "SELECT quote_ident(a.attname), format_type(a.atttypid, a.atttypmod) "
              "|| CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END "
              "|| CASE a.attidentity WHEN 'a' THEN ' ALWAYS AS IDENTITY' "
              "WHEN 'd' THEN ' BY DEFAULT AS IDENTITY' ELSE '' END "
              "|| CASE WHEN a.attgenerated <> '' THEN ' GENERATED' ELSE '' END "
              "|| coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') "
              "|| CASE WHEN a.attcollation IN (0, t.typcollation) THEN '' "
              "ELSE ' COLLATE ' || a.attcollation::regcollation END "
              "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
              "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
              "WHERE a.attrelid = %(t)s AND a.attnum > 0 AND NOT a.attisdropped",
    "sequence": "SELECT quote_ident(a.attname), format_type(s.seqtypid, NULL) || ' BY ' "
                "|| s.seqincrement || ' FROM ' || s.seqmin || ' TO ' || s.seqmax "
                "|| CASE WHEN s.seqcycle THEN ' CYCLE' ELSE '' END "
                "FROM pg_attribute a JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass "
                "AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum "
                "AND d.classid = 'pg_class'::regclass "
                "JOIN pg_sequence s ON s.seqrelid = d.objid WHERE a.attrelid = %(t)s",
    "inherits": "SELECT inhparent::regclass::text, '' FROM pg_inherits "
                "WHERE inhrelid = %(t)s",
    "inherited by": "SELECT inhrelid::regclass::text, '' FROM pg_inherits "
                    "WHERE inhparent = %(t)s",
    "table": "SELECT relname, 'UNLOGGED' FROM pg_class WHERE oid = %(t)s "
             "AND relpersistence = 'u'",
}


def _shape(conn: Any, namespace: int, printed: str, names: list[str]) -> dict[str, Any]:
    """table -> Counter of what _SHAPE reads on it (names left out: only what the
    database does counts), and the name of each, for the operator."""
    from collections import Counter
    shapes: dict[str, Any] = {}
    for table, oid in conn.execute(
            "SELECT relname, oid FROM pg_class WHERE relnamespace = %s AND relkind = 'r' "
            "AND relname = ANY(%s)", (namespace, names)).fetchall():
        found: Any = Counter()
        named: dict[str, str] = {}
        for kind, query in _SHAPE.items():
            for name, text in conn.execute(query, {"t": oid}).fetchall():
                if kind == "index":
                    # "CREATE [UNIQUE ]INDEX name ON schema.table USING ...": the same
                    # index in both schemas, whatever its name
                    head = text.split(" INDEX ", 1)[0] + f" INDEX {name} ON {printed}." \
                        f"{table} USING "
                    if text.startswith(head):
                        text = head.split(" INDEX ", 1)[0] + " INDEX USING " + text[len(head):]
                if kind not in ("constraint", "referenced by", "index"):
                    text = f"{name} {text}".rstrip()
                key = f"{kind} {text}"
                found[key] += 1
                named[key] = f"{kind} {name} {text}" if kind in (
                    "constraint", "referenced by", "index") else key
        shapes[table] = (found, named)
    return shapes


def _not_ours(conn: Any) -> list[str]:
    """What on the shared tables e2m-proxy's DDL does not make, or lacks of it: that
    DDL is run in this transaction on temporary tables of the same names, read back the
    same way, and dropped."""
    from .archive_schema import _VERSION_TABLE, STEPS, _statements
    from .cert_table import _SCHEMA as CERT_SCHEMA
    path = conn.execute("SELECT current_setting('search_path')").fetchone()[0]
    actual_ns = conn.execute("SELECT current_schema()::regnamespace::oid").fetchone()[0]
    printed = conn.execute("SELECT quote_ident(current_schema())").fetchone()[0]
    conn.execute("SELECT set_config('search_path', 'pg_temp', true)")
    try:
        # db init's order: the archive's steps, its version table, the certificates'
        for version in sorted(STEPS):
            for statement in _statements(STEPS[version]["postgres"]):
                conn.execute(statement)
        conn.execute(_VERSION_TABLE["postgres"])
        for statement in _statements(CERT_SCHEMA.format(blob="BYTEA")):
            conn.execute(statement)
        names = [name for name, in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = pg_my_temp_schema() "
            "AND relkind = 'r'").fetchall()]
        made = _shape(conn, conn.execute("SELECT pg_my_temp_schema()").fetchone()[0],
                      "pg_temp", names)
        for name in names:
            conn.execute(f"DROP TABLE pg_temp.{name}")      # names of our own DDL
    finally:
        conn.execute("SELECT set_config('search_path', %s, true)", (path,))
    problems = []
    for table, (found, named) in _shape(conn, actual_ns, printed, names).items():
        expected = made[table][0] if table in made else None
        if expected is None:
            continue
        for key in sorted((found - expected).elements()):
            problems.append(f"{table}: {named[key]} (not made by e2m-proxy)")
        for key in sorted((expected - found).elements()):
            problems.append(f"{table}: lacks {key} (e2m-proxy makes it)")
    return problems


def _take_over(conn: Any, owner: str, node: str) -> None:
    """The database, its schema, then every table and sequence the nodes' account holds
    become ``owner``'s (a sequence a table owns moves with it, so sequences are read
    again after the tables)."""
    from psycopg import sql
    for what, holder in conn.execute(_PLACES).fetchall():
        if holder == node:
            kind, name = what.split(" ", 1)
            conn.execute(sql.SQL("ALTER " + kind.upper() + " {} OWNER TO {}").format(
                sql.Identifier(name), sql.Identifier(owner)))
    for kind, code in (("TABLE", "r"), ("SEQUENCE", "S")):
        for name, holder in conn.execute(_OWNERS + " AND c.relkind = %s", (code,)).fetchall():
            if holder != owner:
                conn.execute(sql.SQL("ALTER " + kind + " {} OWNER TO {}").format(
                    sql.Identifier(name), sql.Identifier(owner)))


def grant_nodes(config: AppConfig, owner: Any, out: list[str]) -> None:
    """The nodes' account (``[cluster] db_url``'s user) gets only what a node does: every
    table and sequence of the shared database is the owner's (taken over where the
    nodes' account made them, or refused with what to do: review 74), none of its rows
    can be changed or removed but the two fields a copy fills, and those only once."""
    import psycopg
    from psycopg import sql
    from .pgconn import connect
    node = config.cluster.db.user
    if node == owner.user:
        raise TakeOverError("--owner-url names the nodes' own account: give the tables to another")
    users = config.auth.table if config.auth is not None and config.auth.pg is not None else None
    role = sql.Identifier(node)
    try:
        with connect(owner, autocommit=False) as conn:
            _take_over(conn, owner.user, node)
            owned = dict(conn.execute(_OWNERS).fetchall())
            # PUBLIC too: a change of owner keeps every grant, and every role is in PUBLIC
            for what in ("ALL ON ALL TABLES IN SCHEMA", "ALL ON ALL SEQUENCES IN SCHEMA",
                         "ALL ON ALL ROUTINES IN SCHEMA", "CREATE ON SCHEMA"):
                conn.execute(sql.SQL("REVOKE " + what + " public FROM PUBLIC, {}").format(role))
            conn.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC, {}").format(
                sql.Identifier(conn.execute("SELECT current_database()").fetchone()[0]), role))
            for what, names in _NODE_GRANTS:
                for name in names:
                    if name in owned:
                        conn.execute(sql.SQL("GRANT " + what + " ON {} TO {}").format(
                            sql.Identifier(name), role))
            if users in owned:
                conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(users),
                                                                          role))
            conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}")
                         .format(role))
            if "bodies" in owned:
                conn.execute(_FILL_ONLY)
                conn.execute(_FILL_TRIGGER)
            left = [name for name, holder in conn.execute(_OWNERS).fetchall()
                    if holder != owner.user]
            left += [what for what, holder in conn.execute(_PLACES).fetchall()
                     if holder == node]
            left += ["schema " + name for name, in conn.execute(_NODE_SCHEMAS, (node,))]
            left += [what for what, in conn.execute(_PLANTED, (node,))]
            if left:
                raise TakeOverError(f"still not {owner.user}'s: {', '.join(sorted(left))}: look "
                              f"inside, then drop it or REASSIGN OWNED BY {node} TO "
                              f"{owner.user}, and run this again")
            odd = [what for query in (_KINDS, _RLS, _CODE, _ACLS) for what, in
                   conn.execute(query, {"node": node, "owner": owner.user}).fetchall()]
            odd += _not_ours(conn)
            if odd:
                raise TakeOverError(f"not as e2m-proxy makes it, so {owner.user} cannot vouch for "
                              f"it: {'; '.join(sorted(odd))}: look inside, then drop or undo "
                              "each (DROP, REVOKE, ALTER TABLE), and run this again")
            conn.commit()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise TakeOverError(
            f"{owner.user} may not take over what {node} owns ({exc.diag.message_primary}): "
            f"as a superuser, REASSIGN OWNED BY {node} TO {owner.user} (the database too), "
            "then run this again"
        ) from None
    except psycopg.Error as exc:
        raise TakeOverError(f"granting {node} its rights failed: {type(exc).__name__}: "
                      f"{exc.diag.message_primary or exc}") from None
    out.append(f"{config.cluster.db.masked()}: tables owned by {owner.user}; {node} may only "
               "read, add rows and fill a copy's empty sender and Request-URI")
