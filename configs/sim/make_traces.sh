#!/bin/sh
# The SUMO traces of configs/sim/, made by real Eclipse SUMO runs
# (pip install 'cloudlet[sumo]'). Same options and seed, same bytes with the same
# SUMO release (the committed ones: SUMO 1.28.0, named in each file's header).
# Run from anywhere: sh configs/sim/make_traces.sh
set -eu
cd "$(dirname "$0")"

# sumo-trace.toml: 40 vehicles on a 3 km street grid (11 x 11 junctions 300 m
# apart, traffic lights, 50 km/h), one departing every 11.25 s over the first
# 7.5 minutes on trips of 1.5 km or more, 15 minutes; up to 36 at once.
cloudlet trace sumo --out downtown.fcd.xml.gz --net grid --period 11.25 \
    --depart-until-s 450 --min-trip-m 1500 --duration-s 900 --seed 2024 --max-speed-m-s 13.89

# sumo-dense-{light,medium,heavy}.toml: a 2 km grid (9 x 9 junctions 250 m apart,
# traffic lights, 50 km/h), trips of 1 km or more, 15 minutes after a 5-minute
# warm-up (the trace opens on traffic at its level): about 20, 60 and 125
# vehicles at a time.
for level in light:15 medium:4.8 heavy:2.4; do
    cloudlet trace sumo --out "dense-${level%%:*}.fcd.xml.gz" --net grid --grid-number 9 \
        --grid-length-m 250 --period "${level#*:}" --min-trip-m 1000 --warmup-s 300 \
        --duration-s 900 --seed 7 --max-speed-m-s 13.89
done

# emulate-burst.toml: eight vehicles together, out from x = 200 m at 15 m/s for
# 75 s and back, 4 m apart (not SUMO: a burst across one border, by design).
python3 - <<'PY'
rows = ["t,id,x,y"]
for t in range(151):
    d = 15.0 * t
    for i in range(8):
        x = 200.0 + (d if d <= 1125.0 else max(2250.0 - d, 0.0)) + 4.0 * i
        rows.append(f"{t},v{i},{x:.1f},{500.0 + 3 * i:.1f}")
with open("burst.csv", "w") as f:
    f.write("\n".join(rows) + "\n")
PY
