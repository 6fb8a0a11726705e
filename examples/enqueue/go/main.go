// Enqueue a postbox webhook event in the transaction that writes the message.
//
// Go with database/sql and github.com/lib/pq.
// Run:  DATABASE_URL=postgres://... go run .
// (in a module: go mod init example && go get github.com/lib/pq; on Debian
// without a module: apt install golang-github-lib-pq-dev, then
// GO111MODULE=off GOPATH=/usr/share/gocode go run main.go).
// CALLBACK_URL overrides the receiver's URL.
//
// The message row and its event commit together or not at all. A field that
// postbox.enqueue rejects raises SQLSTATE 22023 (invalid_parameter_value)
// with the field's name in the error's Column.
package main

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/lib/pq"
)

const conversationID = "5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10" // an existing conversation

var callbackURL = "https://customer.example.com/webhook"

// InvalidEventError says which field postbox.enqueue refused (e.g. data.status).
type InvalidEventError struct {
	Field, Problem string
}

func (e *InvalidEventError) Error() string {
	return fmt.Sprintf("invalid %s: %s", e.Field, e.Problem)
}

// saveMessage inserts the message and enqueues its event in tx.
func saveMessage(tx *sql.Tx, content, status string) (messageID, eventID string, err error) {
	now := time.Now().UTC().Format(time.RFC3339Nano)
	err = tx.QueryRow(`INSERT INTO example_app.messages (conversation_id, content, created_at)
		VALUES ($1, $2, $3) RETURNING id`, conversationID, content, now).Scan(&messageID)
	if err != nil {
		return "", "", err
	}
	data, err := json.Marshal(map[string]string{
		"id":           messageID,
		"content":      content,
		"content_type": "TEXT",
		"type":         "USER_INPUT",
		"channel":      "API",
		"status":       status,
		"created_by":   "user123",
		"updated_by":   "user123",
		"created_at":   now,
		"updated_at":   now,
	})
	if err != nil {
		return "", "", err
	}
	err = tx.QueryRow("SELECT postbox.enqueue($1, $2::uuid, $3::jsonb, $4)",
		callbackURL, conversationID, string(data), conversationID).Scan(&eventID)
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && pqErr.Code == "22023" { // invalid_parameter_value
		problem := strings.TrimPrefix(pqErr.Message, "postbox: invalid "+pqErr.Column+": ")
		return "", "", &InvalidEventError{Field: pqErr.Column, Problem: problem}
	}
	return messageID, eventID, err
}

func main() {
	log.SetFlags(0)
	if u := os.Getenv("CALLBACK_URL"); u != "" {
		callbackURL = u
	}
	db, err := sql.Open("postgres", os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	for _, ddl := range []string{
		"CREATE SCHEMA IF NOT EXISTS example_app",
		`CREATE TABLE IF NOT EXISTS example_app.messages (
			id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
			conversation_id uuid NOT NULL, content text NOT NULL,
			created_at timestamptz NOT NULL)`,
	} {
		if _, err := db.Exec(ddl); err != nil {
			log.Fatal(err)
		}
	}

	// 1. Commit: the message and its event are both written.
	tx, err := db.Begin()
	if err != nil {
		log.Fatal(err)
	}
	messageID, eventID, err := saveMessage(tx, "Hello", "RECEIVED")
	if err != nil {
		log.Fatal(err) // prints "invalid <field>: <problem>" for a refused field
	}
	if err := tx.Commit(); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("committed event %s (message %s)\n", eventID, messageID)

	// 2. Roll back: neither the message nor its event exists.
	tx, err = db.Begin()
	if err != nil {
		log.Fatal(err)
	}
	messageID, eventID, err = saveMessage(tx, "Never sent", "RECEIVED")
	if err != nil {
		log.Fatal(err)
	}
	if err := tx.Rollback(); err != nil {
		log.Fatal(err)
	}
	var kept bool
	err = db.QueryRow("SELECT EXISTS (SELECT 1 FROM postbox.outbox WHERE id = $1)", eventID).Scan(&kept)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("rolled back event %s (message %s); in the outbox: %t\n", eventID, messageID, kept)

	// 3. An invalid field aborts the transaction; the error names the field.
	tx, err = db.Begin()
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	_, _, err = saveMessage(tx, "Bad status", "DONE")
	var invalid *InvalidEventError
	if !errors.As(err, &invalid) {
		log.Fatalf("expected an invalid field, got %v", err)
	}
	fmt.Printf("rejected: %s\n", invalid)
}
