"""Unit conversions as named constants (the public API is in s, 1/min, ml/100 ml/min, mM; the kernels
work in 1/s).

    rate_per_s = rate_per_min / S_PER_MIN
    fp_per_s   = fp_ml_per_100ml_per_min / FP_ML_PER_100ML_PER_MIN_PER_S
    time_s     = time_ms / MS_PER_S
"""

#: Seconds per minute: a rate in 1/min divided by this is the rate in 1/s.
S_PER_MIN = 60.0
#: Plasma flow of 1/s (ml plasma per ml tissue per s) in ml/100 ml/min: 100 ml x 60 s/min.
FP_ML_PER_100ML_PER_MIN_PER_S = 100.0 * S_PER_MIN
#: Milliseconds per second (DICOM TR and trigger times, MultiVolume frame labels are in ms).
MS_PER_S = 1000.0
#: Cubic millimetres per cubic centimetre (voxel volumes in mm^3, lesion volumes in cm^3).
MM3_PER_CM3 = 1000.0
