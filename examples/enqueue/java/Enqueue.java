// Enqueue a postbox webhook event in the transaction that writes the message.
//
// Java 17 with JDBC and the PostgreSQL driver (org.postgresql:postgresql;
// on Debian: apt install libpostgresql-jdbc-java).
// Run:  DATABASE_URL=postgres://... java -cp /usr/share/java/postgresql.jar Enqueue.java
// (CALLBACK_URL overrides the receiver's URL.)
//
// The message row and its event commit together or not at all. A field that
// postbox.enqueue rejects raises SQLSTATE 22023 (invalid_parameter_value)
// with the field's name in the error's COLUMN field.

import java.net.URI;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.time.Instant;
import java.util.Objects;
import java.util.Properties;
import java.util.UUID;
import org.postgresql.util.PSQLException;
import org.postgresql.util.ServerErrorMessage;

public class Enqueue {
    static final String CALLBACK_URL =
            Objects.requireNonNullElse(System.getenv("CALLBACK_URL"), "https://customer.example.com/webhook");
    static final UUID CONVERSATION_ID = UUID.fromString("5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10"); // an existing conversation

    /** postbox.enqueue refused a field: {@code field} names it (e.g. data.status). */
    static class InvalidEventException extends Exception {
        final String field;
        final String problem;

        InvalidEventException(String field, String problem, Throwable cause) {
            super("invalid " + field + ": " + problem, cause);
            this.field = field;
            this.problem = problem;
        }
    }

    record Saved(UUID messageId, UUID eventId) {}

    /** Inserts the message and enqueues its event, in the connection's current transaction. */
    static Saved saveMessage(Connection conn, String content, String status)
            throws SQLException, InvalidEventException {
        String now = Instant.now().toString();
        UUID messageId;
        try (PreparedStatement insert = conn.prepareStatement(
                "INSERT INTO example_app.messages (conversation_id, content, created_at)"
                        + " VALUES (?, ?, ?::timestamptz) RETURNING id")) {
            insert.setObject(1, CONVERSATION_ID);
            insert.setString(2, content);
            insert.setString(3, now);
            try (ResultSet rs = insert.executeQuery()) {
                rs.next();
                messageId = rs.getObject(1, UUID.class);
            }
        }
        // The JDK has no JSON library: the database builds the data object
        // from bound parameters, so nothing needs escaping.
        String enqueue = """
                SELECT postbox.enqueue(?, ?, jsonb_build_object(
                    'id', ?::text, 'content', ?::text, 'content_type', 'TEXT', 'type', 'USER_INPUT',
                    'channel', 'API', 'status', ?::text, 'created_by', 'user123', 'updated_by', 'user123',
                    'created_at', ?::text, 'updated_at', ?::text), ?)""";
        try (PreparedStatement call = conn.prepareStatement(enqueue)) {
            call.setString(1, CALLBACK_URL);
            call.setObject(2, CONVERSATION_ID);
            call.setString(3, messageId.toString());
            call.setString(4, content);
            call.setString(5, status);
            call.setString(6, now);
            call.setString(7, now);
            call.setString(8, CONVERSATION_ID.toString()); // ordering key: one conversation's events in order
            try (ResultSet rs = call.executeQuery()) {
                rs.next();
                return new Saved(messageId, rs.getObject(1, UUID.class));
            }
        } catch (PSQLException e) {
            ServerErrorMessage server = e.getServerErrorMessage();
            if ("22023".equals(e.getSQLState()) && server != null && server.getColumn() != null) {
                String field = server.getColumn();
                String problem = server.getMessage().replace("postbox: invalid " + field + ": ", "");
                throw new InvalidEventException(field, problem, e);
            }
            throw e;
        }
    }

    /** Opens a JDBC connection from a postgres://user:password@host:port/db URL. */
    static Connection connect(String databaseUrl) throws Exception {
        URI uri = new URI(databaseUrl);
        Properties props = new Properties();
        if (uri.getUserInfo() != null) {
            String[] user = uri.getUserInfo().split(":", 2);
            props.setProperty("user", user[0]);
            if (user.length == 2) {
                props.setProperty("password", user[1]);
            }
        }
        String hostAndPort = uri.getRawAuthority().replaceFirst("^.*@", "");
        String query = uri.getRawQuery() == null ? "" : "?" + uri.getRawQuery();
        return DriverManager.getConnection("jdbc:postgresql://" + hostAndPort + uri.getRawPath() + query, props);
    }

    public static void main(String[] args) throws Exception {
        try (Connection conn = connect(System.getenv("DATABASE_URL"))) {
            try (Statement ddl = conn.createStatement()) {
                ddl.execute("CREATE SCHEMA IF NOT EXISTS example_app");
                ddl.execute("CREATE TABLE IF NOT EXISTS example_app.messages ("
                        + " id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                        + " conversation_id uuid NOT NULL, content text NOT NULL,"
                        + " created_at timestamptz NOT NULL)");
            }
            conn.setAutoCommit(false);

            // 1. Commit: the message and its event are both written.
            Saved saved = saveMessage(conn, "Hello", "RECEIVED");
            conn.commit();
            System.out.println("committed event " + saved.eventId() + " (message " + saved.messageId() + ")");

            // 2. Roll back: neither the message nor its event exists.
            Saved undone = saveMessage(conn, "Never sent", "RECEIVED");
            conn.rollback();
            boolean kept;
            try (PreparedStatement check =
                    conn.prepareStatement("SELECT EXISTS (SELECT 1 FROM postbox.outbox WHERE id = ?)")) {
                check.setObject(1, undone.eventId());
                try (ResultSet rs = check.executeQuery()) {
                    rs.next();
                    kept = rs.getBoolean(1);
                }
            }
            conn.commit();
            System.out.println("rolled back event " + undone.eventId() + " (message " + undone.messageId()
                    + "); in the outbox: " + kept);

            // 3. An invalid field aborts the transaction; the error names the field.
            try {
                saveMessage(conn, "Bad status", "DONE");
                conn.commit();
                throw new IllegalStateException("an invalid status was accepted");
            } catch (InvalidEventException e) {
                conn.rollback();
                System.out.println("rejected: " + e.getMessage());
            }
        } catch (InvalidEventException e) {
            System.err.println(e.getMessage());
            System.exit(1);
        }
    }
}
