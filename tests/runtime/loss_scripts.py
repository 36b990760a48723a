"""A scripted sequence of window losses with hand-worked turning points, shared by the runtime tests."""

# eps0 = 0.25, decay 0.5 at turning points 1 and 2, N = 4. S = (9 * 1.0 + 0.8) / 10 = 0.98 from w10 on.
#  w1-w5   1.0 x5                     TP1 at w5 (d = 0); eps -> 0.125; FIFO cleared
#  w6-w9   1.0 x4                     FIFO refills: 4 entries, no test (without the clear, w6 would switch)
#  w10     0.8                        d = 0.2/0.98 = 0.204: <= 0.25 but > 0.125, so no TP (eps did decay)
#  w11-w13 0.8 x3                     FIFO still holds a 1.0: d = 0.204
#  w14     0.8                        FIFO all 0.8: TP2 at w14; eps -> 0.0625
#  w15-w18 0.8 x4, w19 0.7            d = 0.1/0.98 = 0.102: <= 0.125 but > 0.0625, no TP (decayed again)
#  w20-w23 0.7 x4                     w23: FIFO w19..w23 all 0.7: TP3 at w23; eps stays 0.0625
#  w24-w27 0.7 x4, w28 0.6412         d = 0.0588/0.98 = 0.06 <= 0.0625: TP4 at w28 (a 3rd decay would block it)
#  w29-w40 0.6412 then 0.1            done after N = 4: nothing more, whatever the loss
SCRIPT = [1.0] * 9 + [0.8] * 9 + [0.7] * 9 + [0.6412] * 6 + [0.1] * 7
EXPECTED_TURNING_WINDOWS = [5, 14, 23, 28]
EXPECTED_THRESHOLDS = [0.125, 0.0625, 0.0625, 0.0625]
