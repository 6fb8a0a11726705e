// A small persistent inbox kept in a directory, with no database:
//
//   seen-ids.log        every webhook-id ever accepted, one per line: the
//                       deduplication record (loaded into a Set at start)
//   pending/<hex>.json  accepted events not processed yet
//
// Node runs the request handlers one at a time, and `add` is synchronous,
// so checking and recording an id cannot interleave with another request.
// One process owns the directory; for several processes use a database
// with a unique key on the webhook-id instead (see the Python examples).
"use strict";

const fs = require("node:fs");
const path = require("node:path");

class Inbox {
  constructor(dir, handle) {
    this.dir = dir;
    this.pendingDir = path.join(dir, "pending");
    this.seenLog = path.join(dir, "seen-ids.log");
    this.handle = handle;
    this.queue = [];
    this.draining = false;
    fs.mkdirSync(this.pendingDir, { recursive: true });

    this.seen = new Set();
    if (fs.existsSync(this.seenLog)) {
      for (const id of fs.readFileSync(this.seenLog, "utf8").split("\n")) {
        if (id) this.seen.add(id);
      }
    }
    // Events acknowledged before a restart but not processed yet, oldest first.
    const pending = fs
      .readdirSync(this.pendingDir)
      .filter((f) => f.endsWith(".json"))
      .map((f) => ({ f, at: fs.statSync(path.join(this.pendingDir, f)).mtimeMs }))
      .sort((a, b) => a.at - b.at);
    for (const { f } of pending) {
      const id = Buffer.from(f.slice(0, -5), "hex").toString("utf8");
      this.seen.add(id);
      this.queue.push(id);
    }
    this.kick();
  }

  fileOf(id) {
    // Hex keeps any webhook-id a safe file name.
    return path.join(this.pendingDir, `${Buffer.from(id, "utf8").toString("hex")}.json`);
  }

  // Stores the event; false if this webhook-id was already received.
  add(id, body) {
    if (this.seen.has(id)) return false;
    writeDurably(this.fileOf(id), body, "w");
    writeDurably(this.seenLog, `${id}\n`, "a");
    this.seen.add(id);
    this.queue.push(id);
    this.kick();
    return true;
  }

  // Processes queued events after the current request has been answered.
  kick() {
    if (!this.draining) setImmediate(() => this.drain());
  }

  async drain() {
    if (this.draining) return;
    this.draining = true;
    try {
      while (this.queue.length > 0) {
        const id = this.queue[0];
        const file = this.fileOf(id);
        try {
          await this.handle(id, JSON.parse(fs.readFileSync(file, "utf8")));
        } catch (err) {
          console.error(`processing ${id} failed; trying again shortly: ${err.stack || err}`);
          setTimeout(() => this.kick(), 2000);
          return;
        }
        fs.unlinkSync(file);
        this.queue.shift();
      }
    } finally {
      this.draining = false;
    }
  }
}

function writeDurably(file, data, flags) {
  const fd = fs.openSync(file, flags);
  try {
    fs.writeSync(fd, data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

module.exports = { Inbox };
