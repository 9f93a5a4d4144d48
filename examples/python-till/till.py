#!/usr/bin/env python3
"""A till that spends and earns loyalty points, end to end, and checks every answer.

    quote -> reserve -> pay -> record the purchase -> commit      (payment succeeds)
    quote -> reserve -> pay fails -> release                      (payment fails)
    return -> the points the purchase earned are taken back, the points spent on it come back

Every write carries a key the till chooses (purchase_id, reservation_id, return_id) and keeps:
when a call ends in UNAVAILABLE or DEADLINE_EXCEEDED the till cannot know whether it happened,
so it sends the very same request again, and the service answers as the first time without
doing it twice. The till below drops the first answer of ReservePoints, RecordPurchase and
RedeemGift on purpose to show it.

With gifts (LOYALTY_EXPECT_GIFTS=1), the second sale also finds the customer's open gifts
(ListCustomerGifts) and redeems one (RedeemGift), once.

Environment:
  LOYALTY_ENDPOINT   host:port of the service (default 127.0.0.1:50051)
  LOYALTY_POS_KEY    an API key with scope pos (never printed)
  LOYALTY_CUSTOMER   the customer's card number (default: a fresh one)
  LOYALTY_EXPECT_GIFTS=1  the customer got a welcome gift (setup_program.py): the till finds it
                          on the card and redeems it at the second sale

Exit status 0 when every answer was the expected one, 1 otherwise.
"""

import datetime
import os
import sys
import time
import uuid

import grpc

import stubs

stubs.load()
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from loyalty.v1 import checkout_pb2 as co  # noqa: E402
from loyalty.v1 import checkout_pb2_grpc  # noqa: E402
from loyalty.v1 import common_pb2  # noqa: E402
try:
    from loyalty.v1 import gifts_pb2 as gi  # gifts came with a later version of the protos
except ImportError:
    gi = None
from loyalty.v1 import member_pb2  # noqa: E402
from loyalty.v1 import member_pb2_grpc  # noqa: E402

ENDPOINT = os.environ.get("LOYALTY_ENDPOINT", "127.0.0.1:50051")
DEADLINE_SECONDS = 5.0
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def say(text=""):
    print(text, flush=True)


class WrongAnswer(Exception):
    pass


def expect(condition, what):
    if not condition:
        raise WrongAnswer(what)
    say(f"    ok: {what}")


class LostAnswer(grpc.RpcError):
    """What the till sees when the network drops the service's answer: UNAVAILABLE."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset before the answer arrived (simulated by the example)"


class Service:
    """Calls the service with the till's key, a deadline, and retries with the same request."""

    def __init__(self, channel, key):
        self.checkout = checkout_pb2_grpc.CheckoutServiceStub(channel)
        self.member = member_pb2_grpc.MemberServiceStub(channel)
        # The key goes only into the request metadata; nothing below prints it.
        self._metadata = (("authorization", f"Bearer {key}"),)
        self.lost = []  # answers this run dropped on purpose, to compare with the retry's

    def call(self, method, request, *, lose_first_answer=False, attempts=5):
        delay = 0.1
        for attempt in range(1, attempts + 1):
            try:
                response = method(request, metadata=self._metadata, timeout=DEADLINE_SECONDS)
                if lose_first_answer and attempt == 1:
                    self.lost.append(response)
                    raise LostAnswer()
                return response
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == attempts:
                    raise
                say(f"    {error.code().name} ({error.details()}): "
                    f"retry {attempt} with the same request, same ids")
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


# --- the till's side of the world -----------------------------------------------------------

def now_timestamp():
    ts = Timestamp()
    ts.FromDatetime(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
    return ts


def basket(*lines):
    """lines: (sku, category, quantity, amount_minor)."""
    purchase_lines = [common_pb2.PurchaseLine(sku=s, category=c, quantity=q, amount_minor=a)
                      for s, c, q, a in lines]
    return purchase_lines, sum(line.amount_minor for line in purchase_lines)


def pay(amount_minor, *, approved):
    """The card terminal. A real till talks to its payment provider here."""
    outcome = "approved" if approved else "declined"
    say(f"    card terminal: {amount_minor / 100:.2f} EUR {outcome}")
    return approved


def euros(minor):
    return f"{minor / 100:.2f} EUR"


class Till:
    def __init__(self, service, store_id, customer):
        self.service = service
        self.store_id = store_id
        self.customer = customer
        self.last_version = 0

    def balance(self):
        # min_version: never read a balance older than a write this till has seen.
        reply = self.service.call(self.service.member.GetBalance, member_pb2.GetBalanceRequest(
            external_id=self.customer, min_version=self.last_version))
        return reply.balance

    def seen(self, balance):
        self.last_version = max(self.last_version, balance.version)
        return balance

    def quote(self, lines, total):
        return self.service.call(self.service.checkout.QuotePurchase, co.QuotePurchaseRequest(
            external_id=self.customer, store_id=self.store_id, occurred_at=now_timestamp(),
            currency="EUR", total_minor=total, lines=lines))

    def record(self, receipt_id, lines, total, occurred_at, *, lose_first_answer=False):
        request = co.RecordPurchaseRequest(
            external_id=self.customer, purchase_id=receipt_id, store_id=self.store_id,
            occurred_at=occurred_at, currency="EUR", total_minor=total, lines=lines)
        reply = self.service.call(self.service.checkout.RecordPurchase, request,
                                  lose_first_answer=lose_first_answer)
        self.seen(reply.balance)
        return reply

    def reserve(self, reservation_id, receipt_id, points, *, lose_first_answer=False):
        request = co.ReservePointsRequest(
            external_id=self.customer, reservation_id=reservation_id, points=points,
            ttl_seconds=300, purchase_id=receipt_id)
        reply = self.service.call(self.service.checkout.ReservePoints, request,
                                  lose_first_answer=lose_first_answer)
        self.seen(reply.balance)
        return reply

    def commit(self, reservation_id):
        reply = self.service.call(self.service.checkout.CommitReservation,
                                  co.CommitReservationRequest(reservation_id=reservation_id))
        self.seen(reply.balance)
        return reply

    def release(self, reservation_id):
        reply = self.service.call(self.service.checkout.ReleaseReservation,
                                  co.ReleaseReservationRequest(reservation_id=reservation_id))
        self.seen(reply.balance)
        return reply

    def gifts(self):
        reply = self.service.call(self.service.member.ListCustomerGifts,
                                  gi.ListCustomerGiftsRequest(external_id=self.customer))
        return list(reply.grants)

    def redeem_gift(self, code, redemption_key, *, lose_first_answer=False):
        request = gi.RedeemGiftRequest(code=code, redemption_key=redemption_key,
                                       store_id=self.store_id)
        return self.service.call(self.service.checkout.RedeemGift, request,
                                 lose_first_answer=lose_first_answer)

    def give_back(self, receipt_id, return_id, amount_minor):
        reply = self.service.call(self.service.checkout.ReturnPurchase, co.ReturnPurchaseRequest(
            purchase_id=receipt_id, return_id=return_id, amount_minor=amount_minor))
        self.seen(reply.balance)
        return reply


def run(till, expect_gifts):
    run_id = uuid.uuid4().hex[:8]  # receipt ids are unique per till run, like a till's counter
    receipt = lambda n: f"store-7-{run_id}-receipt-{n}"  # noqa: E731

    # 1. A first visit: nothing to spend yet; the purchase earns points.
    say(f"sale 1: first visit of {till.customer}")
    lines, total = basket(("beans-1kg", "coffee-beans", 1, 3200), ("latte", "coffee", 1, 450),
                          ("croissant", "bakery", 1, 350))
    quote = till.quote(lines, total)
    say(f"    quote: {euros(total)} earns {quote.points} points; "
        f"{quote.redeemable_points} points redeemable")
    expect(quote.eligible and quote.points == 400, "40.00 EUR earns 400 points (10 per EUR)")
    expect(quote.redeemable_points == 0, "a new customer has nothing to spend")
    expect(pay(total, approved=True), "payment approved")
    first = till.record(receipt(1), lines, total, now_timestamp())
    expect(first.points_earned == quote.points, "the purchase earned what the quote said")
    expect(first.balance.available == 400 and first.balance.pending == 0,
           "400 points available at once (no pending period)")
    # The come-back gift rule (setup_program.py) grants a gift on a first purchase. A gift code
    # is a bearer secret, like a key: the till prints it on the receipt, never in a log.
    issued = list(getattr(first, "gifts_issued", []))
    for gift in issued:
        say(f"    gift issued by this purchase: {gift.gift_name} (code on the receipt, not here)")
    if expect_gifts and not issued:
        say("    no gift issued by this purchase (this server does not apply gift rules at "
            "checkout yet)")
    elif expect_gifts:
        expect([g.gift_id for g in issued] == ["come-back-cake"],
               "the first purchase granted the come-back gift, once")

    # 2. A second visit: the customer pays part of the basket with points; payment succeeds.
    say("sale 2: spend points, payment succeeds")
    if expect_gifts:
        # The card is scanned: the till looks up the customer's gifts and offers the open ones.
        open_gifts = [g for g in till.gifts() if g.status == gi.GIFT_GRANT_STATUS_ISSUED]
        welcome = [g for g in open_gifts if g.gift_id == "welcome-coffee"]
        expect(len(welcome) == 1, f"the card has its welcome gift ({len(open_gifts)} open gifts)")
        redeemed = till.redeem_gift(welcome[0].code, f"{receipt(2)}-gift-1",
                                    lose_first_answer=True)
        expect(redeemed == till.service.lost[-1], "the retried RedeemGift got the first answer again")
        expect(redeemed.grant.status == gi.GIFT_GRANT_STATUS_REDEEMED,
               f"the gift is redeemed: {redeemed.grant.gift_name}")
        try:
            till.redeem_gift(welcome[0].code, f"{receipt(2)}-gift-2")
            raise WrongAnswer("a gift code was redeemed twice")
        except grpc.RpcError as error:
            expect(error.code() == grpc.StatusCode.FAILED_PRECONDITION,
                   "the same code under another key is FAILED_PRECONDITION: redeemed already")
    before = till.balance()
    lines, total = basket(("latte", "coffee", 1, 450), ("sandwich", "food", 1, 800))
    quote = till.quote(lines, total)
    say(f"    quote: {euros(total)} earns {quote.points} points; up to "
        f"{quote.redeemable_points} points = {euros(quote.redeemable_discount_minor)} off")
    expect(quote.redeemable_points == 400 and quote.redeemable_discount_minor == 400,
           "all 400 points may pay (at most half of 12.50 EUR; 100 points = 1.00 EUR)")
    hold_id = f"{receipt(2)}-points"
    hold = till.reserve(hold_id, receipt(2), quote.redeemable_points, lose_first_answer=True)
    expect(hold == till.service.lost[-1], "the retried ReservePoints got the first answer again")
    expect(hold.balance.available == before.available - 400, "the hold took 400 points at once")
    expect(pay(total - hold.discount_minor, approved=True), "payment approved")
    occurred_at = now_timestamp()  # a retry must send exactly the same receipt
    second = till.record(receipt(2), lines, total, occurred_at, lose_first_answer=True)
    expect(second == till.service.lost[-1], "the retried RecordPurchase got the first answer again")
    expect(second.points_earned == 125, "12.50 EUR earned 125 points, once")
    committed = till.commit(hold_id)
    expect(committed.status == co.RESERVATION_STATUS_COMMITTED, "the hold is committed")
    expect(committed.balance.available == before.available - 400 + 125,
           "after commit: the 400 reserved points are spent, the 125 earned are there")
    expect(committed.balance.lifetime_redeemed == before.lifetime_redeemed + 400,
           "lifetime redeemed grew by 400")
    again = till.commit(hold_id)
    expect(again == committed, "a replayed commit returns the same answer")

    # 3. A third visit: points are held, the card is declined, the hold is released.
    say("sale 3: spend points, payment fails")
    before = till.balance()
    lines, total = basket(("cake", "bakery", 2, 900))
    quote = till.quote(lines, total)
    expect(quote.redeemable_points == before.available == 125, "all 125 points may pay")
    hold_id = f"{receipt(3)}-points"
    hold = till.reserve(hold_id, receipt(3), quote.redeemable_points)
    expect(hold.balance.available == before.available - 125, "the hold took 125 points")
    approved = pay(total - hold.discount_minor, approved=False)
    expect(not approved, "payment declined")
    released = till.release(hold_id)
    expect(released.status == co.RESERVATION_STATUS_RELEASED, "the hold is released")
    expect(released.balance.available == before.available, "the 125 points are back")
    try:
        till.commit(hold_id)
        raise WrongAnswer("a released hold was committed")
    except grpc.RpcError as error:
        expect(error.code() == grpc.StatusCode.FAILED_PRECONDITION,
               "committing a released hold is FAILED_PRECONDITION")

    # 4. The customer brings back everything of sale 2.
    say("return: the goods of sale 2 come back")
    before = till.balance()
    returned = till.give_back(receipt(2), f"{receipt(2)}-return-1", 1250)
    expect(returned.points_clawed_back == second.points_earned,
           "the 125 points sale 2 earned are taken back")
    expect(returned.points_refunded == 400, "the 400 points spent on sale 2 come back")
    expect(returned.balance.available == before.available - 125 + 400,
           "balance: 125 - 125 + 400 = 400")
    replay = till.give_back(receipt(2), f"{receipt(2)}-return-1", 1250)
    expect(replay == returned, "a replayed return returns the same answer, takes nothing twice")

    final = till.balance()
    expect(final.available == 400 and final.pending == 0, "the customer ends with 400 points")
    expect(final.lifetime_earned == 525, "lifetime earned: 400 + 125")
    say(f"till: done; {till.customer} has {final.available} points")


def main():
    key = os.environ.get("LOYALTY_POS_KEY")
    if not key:
        say("set LOYALTY_POS_KEY to an API key with scope pos")
        return 2
    customer = os.environ.get("LOYALTY_CUSTOMER") or f"card-{uuid.uuid4().hex[:12]}"
    with grpc.insecure_channel(ENDPOINT) as channel:
        till = Till(Service(channel, key), "store-7", customer)
        try:
            run(till, gi is not None and os.environ.get("LOYALTY_EXPECT_GIFTS") == "1")
        except WrongAnswer as wrong:
            say(f"    WRONG: expected {wrong}")
            return 1
        except grpc.RpcError as error:
            say(f"    WRONG: unexpected {error.code().name}: {error.details()}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
