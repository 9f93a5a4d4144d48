#!/usr/bin/env python3
"""The merchant's back office, once: sets the program the till example expects.

10 points per EUR, spendable at once, expiring 12 months after they were earned; 100 points pay
1.00 EUR, for at most half of a basket. When the service has gifts, also two gifts: a welcome
gift, given by hand (IssueGift) to LOYALTY_CUSTOMER as they sign up (EnrollCustomer), and a
come-back gift that a customer's first purchase grants (a gift rule). Prints `gifts: on` or
`gifts: off`.

Environment: LOYALTY_ENDPOINT (default 127.0.0.1:50051), LOYALTY_ADMIN_KEY (scope admin; never
printed), LOYALTY_CUSTOMER (optional: the customer who signs up).
"""

import os
import sys

import grpc

import stubs

stubs.load()
from loyalty.v1 import program_pb2 as pr  # noqa: E402
from loyalty.v1 import program_pb2_grpc  # noqa: E402


def main():
    key = os.environ.get("LOYALTY_ADMIN_KEY")
    if not key:
        print("set LOYALTY_ADMIN_KEY to an API key with scope admin")
        return 2
    metadata = (("authorization", f"Bearer {key}"),)
    endpoint = os.environ.get("LOYALTY_ENDPOINT", "127.0.0.1:50051")
    with grpc.insecure_channel(endpoint) as channel:
        programs = program_pb2_grpc.ProgramServiceStub(channel)
        current = programs.GetProgram(pr.GetProgramRequest(), metadata=metadata, timeout=5).program
        program = pr.Program()
        program.CopyFrom(current)
        program.earn_rate.CopyFrom(pr.EarnRate(points=10, currency_units=1))
        program.pending_days = 0
        program.expiry.CopyFrom(pr.ExpiryPolicy(kind=pr.EXPIRY_KIND_MONTHS_AFTER_EARNING,
                                                months=12))
        program.redemption.CopyFrom(pr.RedemptionRule(points_per_unit=100, minimum_points=0,
                                                      max_share_bp=5000))
        programs.UpdateProgram(pr.UpdateProgramRequest(program=program,
                                                       expected_version=current.version),
                               metadata=metadata, timeout=5)
        print("program: 10 points per EUR, 12 months, 100 points = 1.00 EUR, half a basket")

        # Gifts arrived in a later version of the API: skip them when the protos or the
        # server do not have them yet.
        if not hasattr(programs, "PutGiftRule"):
            print("gifts: off (these protos have no gift RPCs)")
            return 0
        from loyalty.v1 import gifts_pb2 as gi
        from loyalty.v1 import member_pb2 as me
        from loyalty.v1 import member_pb2_grpc
        try:
            programs.CreateGift(gi.CreateGiftRequest(gift=gi.Gift(
                gift_id="welcome-coffee", name="A welcome coffee",
                description="For signing up", kind=gi.GIFT_KIND_ITEM,
                validity_days=30, active=True)), metadata=metadata, timeout=5)
            # The come-back gift: a customer's first purchase grants it, for the second visit.
            programs.CreateGift(gi.CreateGiftRequest(gift=gi.Gift(
                gift_id="come-back-cake", name="A slice of cake on your next visit",
                kind=gi.GIFT_KIND_ITEM, validity_days=30, active=True)),
                metadata=metadata, timeout=5)
            programs.PutGiftRule(gi.PutGiftRuleRequest(rule=gi.GiftRule(
                rule_id="come-back", trigger=gi.GIFT_TRIGGER_FIRST_PURCHASE,
                gift_id="come-back-cake", delay_hours=0, active=True)),
                metadata=metadata, timeout=5)
            # A customer signs up at the counter and gets the welcome gift by hand.
            customer = os.environ.get("LOYALTY_CUSTOMER")
            if customer:
                members = member_pb2_grpc.MemberServiceStub(channel)
                members.EnrollCustomer(me.EnrollCustomerRequest(
                    external_id=customer, display_name="Example customer"),
                    metadata=metadata, timeout=5)
                programs.IssueGift(gi.IssueGiftRequest(
                    external_id=customer, gift_id="welcome-coffee",
                    issue_key=f"welcome-{customer}"), metadata=metadata, timeout=5)
                print(f"customer {customer} signed up, with a welcome gift")
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                print("gifts: off (the server does not implement them yet)")
                return 0
            raise
        print("gifts: on (a welcome gift by hand; a come-back gift rule on the first purchase)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        print(f"setting the program failed: {error.code().name}: {error.details()}")
        sys.exit(1)
