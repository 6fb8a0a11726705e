package com.example.webhooks;

import java.util.concurrent.atomic.AtomicInteger;

/** Test aid: answers the first N verified deliveries with 500, so a retry can be watched. */
public final class FailFirst {
    private final AtomicInteger left;

    public FailFirst(int n) {
        this.left = new AtomicInteger(n);
    }

    /** True while failures are left to hand out (and takes one). */
    public boolean take() {
        return left.getAndUpdate(n -> Math.max(0, n - 1)) > 0;
    }
}
